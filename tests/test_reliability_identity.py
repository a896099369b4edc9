"""Issue 21, identity side: one identity for the data (checked by resume, eval, --baseline reuse,
the teacher cache and soft-label stores), the run directory taken before any work, a fresh start
with a clean record, and signals honoured in every phase. Tiny digits runs and tiny image folders
on CPU; every test goes through the CLI."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from engine_helpers import digits_teacher  # noqa: F401  (a fixture)
from data_fixtures import error_line, wsld
from reliability_helpers import TINY, WSLD, assert_same_run, finish, load, records, run_to_end, start, sub_env, wait_for
from safetensors.torch import load_file, save_file

from wsld.cli import main












def _last_line(text: str) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else ""


def _teacher_run(cache: Path) -> Path:
    runs = list(cache.glob("*/run"))
    return runs[0] if runs else cache / "none"


# --------------------------------------------------------------------------- F1: signals in every phase


def test_F1_sigterm_in_the_teachers_last_evaluation_stops_the_run_with_its_resume_command(tmp_path, capsys):
    """The first run trains its teacher (one epoch), whose closing evaluation is slowed; a SIGTERM
    then must stop the run before the student's first step, with a checkpoint and the resume
    command (not train the student to the end and exit 0); the resumed run ends like an
    uninterrupted one."""
    cache, run, want = tmp_path / "cache", tmp_path / "run", tmp_path / "want"
    args = [*TINY, "train.epochs=1", "train.threads=1", f"model.teacher_cache={cache}"]  # one thread here and there
    log = tmp_path / "1.log"
    p = start([*WSLD, "train", *args, "--out", str(run)], log, WSLD_TEST_SLOW_EVAL="0.3")
    try:
        # the teacher's last step is logged at the end of its epoch, just before its evaluation
        wait_for(lambda: any(r["kind"] == "train" and r["global_step"] == 21 for r in records(_teacher_run(cache))), p, log)
        os.killpg(p.pid, signal.SIGTERM)
        rc = p.wait(timeout=120)
    finally:
        finish(p)
    out = log.read_text(errors="replace")
    assert rc == 143 and "Traceback" not in out, out[-3000:]
    line = _last_line(out)
    assert "SIGTERM" in line and f"wsld train --resume {run}" in line, line
    assert load(run / "last.pt")["global_step"] == 0 and not (run / "summary.json").exists()
    assert list(cache.glob("*/teacher.safetensors")), "the teacher phase had finished: its weights are cached"
    rc, _, err = wsld(capsys, "train", "--resume", run)
    assert rc == 0, err
    rc, _, err = wsld(capsys, "train", *args, "--out", want)
    assert rc == 0, err
    assert_same_run(run, want)


# --------------------------------------------------------------------------- F2, F3: the run directory


def test_F2_a_second_run_into_the_same_out_is_refused_at_once_naming_the_holder(tmp_path):
    """The first run holds RUN from its first second (here it is still training its teacher); a
    second `wsld train --out RUN` is refused at once, with the holder's pid, before any data or
    teacher work of its own (its teacher cache stays empty)."""
    run = tmp_path / "run"
    log = tmp_path / "a.log"
    a = start([*WSLD, "train", *TINY, "train.epochs=1", f"model.teacher_cache={tmp_path / 'ca'}", "--out", str(run)], log,
               WSLD_TEST_SLOW_STEP="0.2")  # fmt: skip
    try:
        wait_for(lambda: bool(records(_teacher_run(tmp_path / "ca"))), a, log)  # a is in its teacher phase
        t0 = time.monotonic()
        b = subprocess.run([*WSLD, "train", *TINY, "train.epochs=1", f"model.teacher_cache={tmp_path / 'cb'}", "--out", str(run)],
                           capture_output=True, text=True, env=sub_env(), timeout=120)  # fmt: skip
        took = time.monotonic() - t0
        assert a.poll() is None  # the first run goes on undisturbed
    finally:
        finish(a)
    assert b.returncode == 2, b.stderr
    line = error_line(b.stderr)
    assert "in use by another wsld process" in line and f"pid {a.pid}" in line, line
    assert not (tmp_path / "cb").exists() and "teacher" not in b.stderr.replace(line, ""), b.stderr
    assert took < 60, took


def test_F3_a_fresh_start_in_a_folder_writes_a_fresh_record_and_resumes(tmp_path, capsys, digits_teacher):  # noqa: F811
    """A first start in RUN dies before its first checkpoint (here it diverges: run.json written, no
    last.pt); a new run started there with another teacher must record its own files, so that it
    resumes (the old record named the first teacher, and the resume was refused)."""
    other = tmp_path / "other_teacher.safetensors"
    state = load_file(digits_teacher)
    first = sorted(state)[0]
    state[first] = state[first] * 1.0001  # other weights: another digest
    save_file(state, other)
    run = tmp_path / "run"
    base = ["train", *TINY, "train.epochs=1", "--out", run]
    rc, _, err = wsld(capsys, *base, f"model.teacher_weights={digits_teacher}", "train.lr=1e6", "checkpoint.every_steps=0")
    assert rc == 3 and (run / "run.json").is_file() and not (run / "last.pt").exists(), err
    rc, _, err = wsld(capsys, *base, f"model.teacher_weights={other}")
    assert rc == 0, err
    assert json.loads((run / "run.json").read_text())["files"]["teacher"]["path"] == str(other)
    rc, _, err = wsld(capsys, "train", "--resume", run)
    assert rc == 0, err


# --------------------------------------------------------------------------- F4: resume and eval on changed data


def _tiny_folder(root: Path) -> Path:
    """Three classes of 8x8 PNGs (6 train, 2 val each), one colour per class plus noise."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in (("train", 6), ("val", 2)):
        for c, col in {"a": (200, 30, 30), "b": (30, 200, 30), "c": (30, 30, 200)}.items():
            (root / split / c).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                img = np.clip(np.array(col)[None, None] + rng.integers(-30, 30, (8, 8, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(img).save(root / split / c / f"{c}{i}.png")
    return root


FOLDER_CE = ["data.format=folder", "data.dataset=tiny", "data.image_size=8", "data.batch_size=6", "data.workers=0",
             "train.progress=false", "train.epochs=1", "distill.loss=ce", "model.student=cnn_student", "train.threads=1"]  # fmt: skip


@pytest.fixture(scope="module")
def folder_run(tmp_path_factory):
    """A finished CE run on a tiny image folder: (run, its data)."""
    root = tmp_path_factory.mktemp("folder_run")
    data = _tiny_folder(root / "data")
    assert main(["train", *FOLDER_CE, f"data.data_path={data}", "--out", str(root / "run")]) == 0
    return root / "run", data


def _changed(data: Path, dest: Path, how: str) -> Path:
    shutil.copytree(data, dest)
    if how == "renamed":  # every label after it shifts: 'b' -> 'z' sorts last
        for split in ("train", "val"):
            (dest / split / "b").rename(dest / split / "z")
    elif how == "swapped":  # the images of two classes trade folders: same names, same counts
        for split in ("train", "val"):
            (dest / split / "a").rename(dest / split / "tmp")
            (dest / split / "b").rename(dest / split / "a")
            (dest / split / "tmp").rename(dest / split / "b")
    elif how == "removed":
        (dest / "val" / "a" / "a0.png").unlink()
        (dest / "train" / "c" / "c5.png").unlink()
    elif how == "replaced":  # the same file names, other images
        (dest / "val" / "a" / "a0.png").write_bytes((dest / "val" / "c" / "c1.png").read_bytes() + b"\0" * 7)
    return dest


EXPECT = {
    "renamed": "class 'b' was renamed 'z'",
    "swapped": "holds other content",
    "removed": "1 fewer than 6",
    "replaced": "holds other content",
}


@pytest.mark.parametrize("how", sorted(EXPECT))
def test_F4_eval_on_changed_data_is_refused_saying_what_differs(tmp_path, capsys, folder_run, how):
    run, data = folder_run
    other = _changed(data, tmp_path / "data", how)
    rc, out, err = wsld(capsys, "eval", run / "last.pt", f"data.data_path={other}")
    line = error_line(err)
    assert rc == 2 and EXPECT[how] in line and "--allow-data-change" in line and not out, line
    rc, out, err = wsld(capsys, "eval", run / "last.pt", f"data.data_path={data}")  # the run's own data
    assert rc == 0 and "top-1" in out, err


def test_F4_resume_on_changed_data_is_refused_unless_allowed(tmp_path, capsys, folder_run):
    run, data = folder_run
    run = Path(shutil.copytree(run, tmp_path / "run"))
    for how in ("renamed", "removed"):
        other = _changed(data, tmp_path / how, how)
        rc, _, err = wsld(capsys, "train", "--resume", run, f"data.data_path={other}")
        line = error_line(err)
        assert rc == 2 and f"cannot resume {run}" in line and ("'b' was renamed 'z'" if how == "renamed" else "1 fewer than 18") in line, line
    # the override: one note, the run goes on; run.json then records the data it now uses
    rc, _, err = wsld(capsys, "train", "--resume", run, f"data.data_path={tmp_path / 'removed'}", "--allow-data-change")
    assert rc == 0 and "accepted (--allow-data-change)" in err, err
    assert json.loads((run / "run.json").read_text())["data"]["train"]["count"] == 17


def test_F4_an_exported_weights_file_is_checked_against_its_run_folder(tmp_path, capsys, folder_run):
    """eval of a .safetensors file in a run folder reads the run's record of its data."""
    run, data = folder_run
    run = Path(shutil.copytree(run, tmp_path / "run"))
    save_file(load(run / "last.pt")["student"], run / "student.safetensors")
    other = _changed(data, tmp_path / "data", "renamed")
    rc, _, err = wsld(capsys, "eval", run / "student.safetensors", f"data.data_path={other}")
    assert rc == 2 and "class 'b' was renamed 'z'" in error_line(err)


# --------------------------------------------------------------------------- G1, G2, G7: what is reused


def _idx_dataset(folder: Path, swap: bool = False, invert: bool = False) -> Path:
    """scikit-learn's digits written as Fashion-MNIST IDX files, so that ``data.dataset=fashion-mnist``
    reads them from ``data.data_path``: two folders are two datasets behind one dataset name.
    ``swap``: the train and val images trade places; ``invert``: every pixel p becomes 255 - p."""
    import struct

    from wsld.data.builtin import load_digits_split

    folder.mkdir(parents=True)
    splits = {"train": load_digits_split("train"), "val": load_digits_split("val")}
    if swap:
        splits = {"train": splits["val"], "val": splits["train"]}
    for split, (images, labels) in splits.items():
        stem = "train" if split == "train" else "t10k"
        pixels = images[:, 0].numpy()
        pixels = 255 - pixels if invert else pixels
        (folder / f"{stem}-images-idx3-ubyte").write_bytes(struct.pack(">HBB3I", 0, 8, 3, *pixels.shape) + pixels.tobytes())
        (folder / f"{stem}-labels-idx1-ubyte").write_bytes(struct.pack(">HBBI", 0, 8, 1, len(labels)) + bytes(labels))
    return folder


IDX = [*TINY, "data.dataset=fashion-mnist", "train.epochs=1", "train.threads=1", "distill.allow_weak_teacher=true"]


def test_G1_two_datasets_under_one_name_never_share_a_cached_teacher(tmp_path, capsys):
    """Dataset B holds A's validation images as its training images, under the same data.dataset
    name and config: B's run must train a teacher of its own, not reuse A's (trained on B's val)."""
    cache = f"model.teacher_cache={tmp_path / 'cache'}"
    a, b = _idx_dataset(tmp_path / "a"), _idx_dataset(tmp_path / "b", swap=True)
    rc, _, err = wsld(capsys, "train", *IDX, cache, f"data.data_path={a}", "--out", tmp_path / "ra")
    assert rc == 0 and "training cnn_teacher" in err, err
    rc, _, err = wsld(capsys, "train", *IDX, cache, f"data.data_path={b}", "--out", tmp_path / "rb")
    assert rc == 0 and "training cnn_teacher" in err and "teacher: reusing" not in err, err
    assert len(list((tmp_path / "cache").glob("*/teacher.safetensors"))) == 2
    # the same data moved elsewhere is the same data: its cached teacher is reused
    shutil.copytree(a, tmp_path / "a_moved")
    rc, _, err = wsld(capsys, "train", *IDX, cache, f"data.data_path={tmp_path / 'a_moved'}", "--out", tmp_path / "rc")
    assert rc == 0 and "teacher: reusing" in err, err


def test_G2_a_soft_label_store_made_from_other_images_is_refused(tmp_path, capsys, digits_teacher):  # noqa: F811
    """A store made on dataset A; dataset B has the same images count, classes and labels but other
    pixels: training B with A's store is refused, saying so; --allow-data-change accepts it."""
    a, b = _idx_dataset(tmp_path / "a"), _idx_dataset(tmp_path / "b", invert=True)
    store = tmp_path / "store"
    common = [*IDX, f"model.teacher_weights={digits_teacher}"]
    rc, _, err = wsld(capsys, "soft-labels", *common, f"data.data_path={a}", "--crops", "1", "--out", store)
    assert rc == 0, err
    rc, _, err = wsld(capsys, "train", *common, f"data.data_path={b}", f"distill.soft_labels={store}", "--out", tmp_path / "r")
    line = error_line(err)
    assert rc == 2 and "was made from other data" in line and "train split holds other content" in line, line
    assert not (tmp_path / "r").exists()
    rc, _, err = wsld(capsys, "train", *common, f"data.data_path={b}", f"distill.soft_labels={store}", "--out", tmp_path / "r",
                      "--allow-data-change")  # fmt: skip
    assert rc == 0 and "accepted (--allow-data-change)" in err, err
    # nor does `wsld soft-labels` on B add to (or call finished) the store made from A
    rc, _, err = wsld(capsys, "soft-labels", *common, f"data.data_path={b}", "--crops", "1", "--out", store)
    line = error_line(err)
    assert rc == 2 and "other data (the train split holds other content" in line, line


def test_G7_baseline_refuses_an_earlier_ce_run_of_another_seed(tmp_path, capsys, digits_teacher):  # noqa: F811
    """RUN-ce made with another seed (and rate) is not this run's baseline: refused before any
    training, naming the keys, instead of being reported as "same student, seed and recipe"."""
    args = [*TINY, "train.epochs=1", f"model.teacher_weights={digits_teacher}"]
    run = tmp_path / "run"
    rc, _, err = wsld(capsys, "train", *args, "distill.loss=ce", "train.seed=1", "train.lr=0.05", "data.augment=false",
                      "--out", f"{run}-ce")  # fmt: skip
    assert rc == 0, err
    rc, out, err = wsld(capsys, "train", *args, "--baseline", "--out", run)
    line = error_line(err)
    assert rc == 2 and f"{run}-ce" in line and "train.seed (1 there, 0 here)" in line and "train.lr" in line, line
    assert not run.exists() and "same student, seed and recipe" not in out
    # --allow-data-change accepts other images, never another recipe, a data.* key's included
    rc, out, err = wsld(capsys, "train", *args, "--baseline", "--allow-data-change", "--out", run)
    line = error_line(err)
    assert rc == 2 and "data.augment (False there, True here)" in line, line
    assert not run.exists()
