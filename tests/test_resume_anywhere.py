"""Resume from anywhere (docs/engine.md, "Resume"): a run started with relative paths resumes from
another directory by its absolute path; a moved teacher file may be pointed to (same weights only);
overrides that change the maths are refused; ``train.epochs`` extends a constant/step run to the
weights of a run of that length from the start (cosine is refused); ``checkpoint.keep_every_epochs``
keeps epoch checkpoints that ``wsld eval`` reads. Tiny digits runs on CPU, deterministic."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
import yaml
from engine_helpers import (  # noqa: F401  (digits_teacher is a fixture)
    TINY, WSLD, comparable, digits_teacher, load_ck, one_error_line, records, run_cli, sub_env,
)
from safetensors.torch import load_file, save_file

from wsld.engine.hooks import STOP_AFTER_STEPS_ENV, STOP_EXIT_CODE

DET = ["train.deterministic=true", "checkpoint.every_steps=3"]


@contextlib.contextmanager
def inside(folder: Path):
    old = os.getcwd()
    os.chdir(folder)
    try:
        yield
    finally:
        os.chdir(old)


def same_student(a: Path, b: Path) -> None:
    sa, sb = load_ck(a)["student"], load_ck(b)["student"]
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), f"{a} vs {b}: {k} differs"


@pytest.fixture(scope="module")
def started(digits_teacher, tmp_path_factory):  # noqa: F811
    """Folder A holds the teacher file; from A, with relative paths only: an uninterrupted run
    ``whole`` and a run ``split`` crashed after 14 of its 20 steps (last checkpoint: step 12)."""
    root = tmp_path_factory.mktemp("anywhere")
    a = root / "a"
    a.mkdir()
    shutil.copy(digits_teacher, a / "teacher.safetensors")
    args = [*TINY, *DET, "model.teacher_weights=teacher.safetensors", "model.teacher_cache=cache"]
    with inside(a):
        rc, _, err = run_cli(["train", *args, "--out", "whole"])
    assert rc == 0, err
    crashed = subprocess.run([*WSLD, "train", *args, "--out", "split"], cwd=a, env=sub_env(**{STOP_AFTER_STEPS_ENV: "14"}),
                             capture_output=True, text=True, timeout=300)  # fmt: skip
    assert crashed.returncode == STOP_EXIT_CODE, crashed.stderr
    return root, a


def crashed_copy(started, name: str) -> Path:
    root, a = started
    run = root / name
    shutil.copytree(a / "split", run)
    return run


def test_a_run_started_with_relative_paths_stores_them_absolute(started):
    _, a = started
    cfg = yaml.safe_load((a / "split" / "config.yaml").read_text())
    assert cfg["model"]["teacher_weights"] == str(a / "teacher.safetensors")
    assert cfg["model"]["teacher_cache"] == str(a / "cache")
    rec = json.loads((a / "split" / "run.json").read_text())
    assert rec["cwd"] == str(a) and rec["run_dir"] == str(a / "split")
    assert rec["files"]["teacher"]["path"] == str(a / "teacher.safetensors") and len(rec["files"]["teacher"]["sha256"]) == 64
    assert json.loads((a / "whole" / "summary.json").read_text())["run_dir"] == str(a / "whole")


def test_resumed_by_absolute_path_from_another_directory(started, tmp_path):
    _, a = started
    run = crashed_copy(started, "from-b")
    b = tmp_path / "b"
    b.mkdir()
    with inside(b):
        rc, out, err = run_cli(["train", "--resume", str(run)])
    assert rc == 0, err
    same_student(run / "last.pt", a / "whole" / "last.pt")
    assert comparable(records(run)) == comparable(records(a / "whole"))
    assert list(b.iterdir()) == []  # nothing written where we stood


def test_old_run_with_relative_paths_resolves_them_and_says_against_what(started, tmp_path):
    """A config.yaml written with relative paths (as before they were stored absolute): against the
    current directory when the run records none, against its recorded one when it does."""
    root, a = started
    for name, record, cwd, where in [("old", False, a, "the current directory"), ("old-rec", True, tmp_path, "the run's working directory")]:
        run = crashed_copy(started, name)
        cfg = yaml.safe_load((run / "config.yaml").read_text())
        cfg["model"]["teacher_weights"] = "teacher.safetensors"
        (run / "config.yaml").write_text(yaml.safe_dump(cfg))
        if not record:
            (run / "run.json").unlink()
        with inside(cwd):
            rc, _, err = run_cli(["train", "--resume", os.path.relpath(run)])  # a relative RUN_DIR: from here
        assert rc == 0, err
        assert f"resolved against {where} {a}" in err, err
        assert yaml.safe_load((run / "config.yaml").read_text())["model"]["teacher_weights"] == str(a / "teacher.safetensors")
        same_student(run / "last.pt", a / "whole" / "last.pt")
    assert json.loads((root / "old" / "run.json").read_text())["cwd"] == str(a)  # recorded at its first resume


def test_moved_teacher_file_may_be_given_other_weights_are_refused(started, tmp_path):
    _, a = started
    run = crashed_copy(started, "moved")
    moved = tmp_path / "elsewhere" / "teacher-moved.safetensors"
    moved.parent.mkdir()
    shutil.copy(a / "teacher.safetensors", moved)
    other = tmp_path / "other.safetensors"
    state = load_file(str(moved))
    save_file({k: (v + 1e-3 if v.is_floating_point() else v) for k, v in state.items()}, str(other))
    before = (run / "last.pt").read_bytes()
    rc, _, err = run_cli(["train", "--resume", str(run), f"model.teacher_weights={other}"])
    line = one_error_line(err)
    assert rc == 2 and "model.teacher_weights" in line and "sha256" in line and str(other) in line
    assert (run / "last.pt").read_bytes() == before and not (run / "summary.json").exists()
    rc, _, err = run_cli(["train", "--resume", str(run), f"model.teacher_weights={moved}"])
    assert rc == 0, err
    same_student(run / "last.pt", a / "whole" / "last.pt")
    assert yaml.safe_load((run / "config.yaml").read_text())["model"]["teacher_weights"] == str(moved)


@pytest.mark.parametrize("override, key", [
    ("train.lr=0.2", "train.lr"), ("data.batch_size=64", "data.batch_size"),
    ("model.teacher_weights=IMAGENET1K_V1", "model.teacher_weights"), ("distill.soft_labels=/x/store", "distill.soft_labels"),
])  # fmt: skip
def test_overrides_that_change_the_maths_are_refused(started, override, key):
    _, a = started
    rc, _, err = run_cli(["train", "--resume", str(a / "split"), override])
    line = one_error_line(err)
    assert rc == 2 and key in line and "maths" in line


# --------------------------------------------------------------------------- train.epochs and keep_every_epochs


@pytest.fixture(scope="module")
def step_runs(digits_teacher, tmp_path_factory):  # noqa: F811
    """A step schedule (lr x 0.5 at epoch 2): a finished 2-epoch run, and a 3-epoch run from the
    start that keeps every epoch's checkpoint."""
    base = tmp_path_factory.mktemp("extend")
    args = [*TINY, "train.deterministic=true", f"model.teacher_weights={digits_teacher}", "train.schedule=step",
            "train.step_size=2", "train.gamma=0.5"]  # fmt: skip
    rc, _, err = run_cli(["train", *args, "--out", str(base / "two")])
    assert rc == 0, err
    rc, _, err = run_cli(["train", *args, "train.epochs=3", "checkpoint.keep_every_epochs=1", "--out", str(base / "three")])
    assert rc == 0, err
    return base


def test_extending_a_finished_step_run_equals_the_longer_run(step_runs):
    run = step_runs / "extended"
    shutil.copytree(step_runs / "two", run)
    rc, out, err = run_cli(["train", "--resume", str(run), "train.epochs=3"])
    assert rc == 0, err
    same_student(run / "last.pt", step_runs / "three" / "last.pt")
    assert json.loads((run / "summary.json").read_text())["epochs"] == 3
    assert json.loads((run / "summary_epochs_2.json").read_text())["epochs"] == 2  # the shorter run's summary is kept
    assert [r["epoch"] for r in records(run) if r["kind"] == "eval"] == [1, 2, 3]
    assert comparable(records(run)) == comparable(records(step_runs / "three"))  # the metrics continue
    assert yaml.safe_load((run / "config.yaml").read_text())["train"]["epochs"] == 3


def test_fewer_epochs_than_done_and_cosine_extension_are_refused(step_runs, started):
    run = step_runs / "refused"
    shutil.copytree(step_runs / "two", run)
    rc, _, err = run_cli(["train", "--resume", str(run), "train.epochs=1"])
    assert rc == 2 and "already trained 2 epochs" in one_error_line(err)
    _, a = started  # cosine: its rate at every step depends on the total length
    cos = step_runs / "cosine"
    shutil.copytree(a / "whole", cos)
    before = {p.name: p.read_bytes() for p in cos.iterdir() if p.is_file()}
    rc, _, err = run_cli(["train", "--resume", str(cos), "train.epochs=4"])
    line = one_error_line(err)
    assert rc == 2 and "train.schedule=cosine" in line and "total length" in line
    assert {p.name: p.read_bytes() for p in cos.iterdir() if p.is_file()} == before  # nothing touched


def test_keep_every_epochs_files_exist_and_evaluate(step_runs):
    three = step_runs / "three"
    assert sorted(p.name for p in three.glob("epoch_*.pt")) == ["epoch_1.pt", "epoch_2.pt", "epoch_3.pt"]
    assert sorted(p.name for p in (step_runs / "two").glob("epoch_*.pt")) == []  # off by default
    same_student(three / "epoch_3.pt", three / "last.pt")
    assert load_ck(three / "epoch_1.pt")["epoch"] == 1
    rc, out, err = run_cli(["eval", str(three / "epoch_1.pt"), "train.progress=false"])
    assert rc == 0 and "top-1" in out and "epoch 1" in out, err


def test_a_users_model_is_found_where_the_run_started(tmp_path):
    """model.student=package.module:callable is imported from the current directory; resumed from
    elsewhere, the run's recorded start directory is searched too."""
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    (a / "anywhere_models.py").write_text("from torch import nn\n\ndef tiny(num_classes):\n"
                                          "    return nn.Sequential(nn.Flatten(), nn.Linear(64, num_classes))\n")
    args = [*TINY, "train.epochs=1", "distill.loss=ce", "train.schedule=constant", "model.student=anywhere_models:tiny"]
    first = subprocess.run([*WSLD, "train", *args, "--out", "run"], cwd=a, env=sub_env(), capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr
    again = subprocess.run([*WSLD, "train", "--resume", str(a / "run"), "train.epochs=2"], cwd=b, env=sub_env(),
                           capture_output=True, text=True, timeout=300)  # fmt: skip
    assert again.returncode == 0, again.stderr
    assert json.loads((a / "run" / "summary.json").read_text())["epochs"] == 2


def test_a_moved_soft_label_store_may_be_given_another_one_is_refused(digits_teacher, tmp_path):  # noqa: F811
    args = [*TINY, f"model.teacher_weights={digits_teacher}", "train.epochs=1", "train.schedule=constant"]
    for name, crops in [("store", "1"), ("other", "2")]:
        rc, _, err = run_cli(["soft-labels", *args, "--crops", crops, "--precision", "float32", "--out", str(tmp_path / name)])
        assert rc == 0, err
    rc, _, err = run_cli(["train", *args, f"distill.soft_labels={tmp_path / 'store'}", "--out", str(tmp_path / "run")])
    assert rc == 0, err
    moved = tmp_path / "moved" / "store"
    moved.parent.mkdir()
    shutil.copytree(tmp_path / "store", moved)  # a copy, not a rename: this process still holds the first one open
    shutil.rmtree(tmp_path / "store")
    rc, _, err = run_cli(["train", "--resume", str(tmp_path / "run"), "train.epochs=2", f"distill.soft_labels={tmp_path / 'other'}"])
    assert rc == 2 and "distill.soft_labels" in one_error_line(err) and "sha256" in err
    rc, _, err = run_cli(["train", "--resume", str(tmp_path / "run"), "train.epochs=2", f"distill.soft_labels={moved}"])
    assert rc == 0, err
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["epochs"] == 2
