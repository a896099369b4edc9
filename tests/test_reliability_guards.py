"""Numerical guard, unwritable / full run directory, and safe loading of checkpoints and configs.

Every failure here must be one ``wsld: error: ...`` line with a non-zero exit (2 for bad input,
3 for a diverged run), no traceback, and no damaged or half-written file under a final name.
"""

from __future__ import annotations

import math
import os
import pickle
import uuid
from pathlib import Path

import pytest
import torch

from reliability_helpers import final_files_loadable, load, records
from wsld.cli import main

CE_TINY = [
    "data.dataset=digits", "data.batch_size=64", "data.workers=0", "train.progress=false", "train.epochs=1",
    "distill.loss=ce", "train.log_every=1", "train.lr=0.025",
    # the models and loss settings these tests were written for, pinned so a new built-in default does not change them
    "model.teacher=cnn_teacher", "model.student=cnn_student", "distill.T=4.0", "distill.alpha=2.25",
]  # fmt: skip
WSLD_TINY = [
    "data.dataset=digits", "data.batch_size=64", "data.workers=0", "train.progress=false", "train.epochs=1",
    "teacher_train.epochs=1", "train.lr=0.025",
    # the models and loss settings these tests were written for, pinned so a new built-in default does not change them
    "model.teacher=cnn_teacher", "model.student=cnn_student", "distill.T=4.0", "distill.alpha=2.25",
]  # fmt: skip


def wsld(capsys, *argv: str) -> tuple[int, str]:
    """Run the CLI in-process; returns (exit code, stderr)."""
    capsys.readouterr()
    rc = main([str(a) for a in argv])
    return rc, capsys.readouterr().err


def error_line(err: str) -> str:
    """The CLI's one error line; fails on a traceback or on more than one error line."""
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("wsld: error:")]
    assert len(lines) == 1, err
    return lines[0]


def finite(state: dict) -> bool:
    return all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())


# --------------------------------------------------------------------------- numerical guard


def test_divergence_stops_with_the_step_and_the_last_good_checkpoint(tmp_path, capsys, teacher_cache):
    """A huge learning rate makes the loss overflow after a few steps (a real divergence, no hook)."""
    run = tmp_path / "run"
    rc, err = wsld(capsys, "train", *WSLD_TINY, teacher_cache, "train.lr=1e4", "checkpoint.every_steps=1", "--out", run)
    assert rc == 3
    line = error_line(err)
    assert "loss is not finite at epoch 1, step" in line and f"last good checkpoint: {run / 'last.pt'}" in line
    diverged = [r for r in records(run) if r["kind"] == "diverged"]
    assert len(diverged) == 1
    step = diverged[0]["global_step"]
    assert f"(global step {step})" in line
    ck = load(run / "last.pt")
    assert ck["global_step"] == step - 1, "last.pt should hold the last step before the non-finite loss"
    assert finite(ck["student"]), "a non-finite checkpoint was written over the good one"
    assert not (run / "summary.json").exists()
    final_files_loadable(run)


def test_inf_in_the_student_weights_stops_at_step_1_and_writes_no_checkpoint(tmp_path, capsys, teacher_cache):
    from safetensors.torch import save_file

    from wsld.models import build_model

    state = build_model("cnn_student", 10, in_channels=1, role="student").state_dict()
    name = next(k for k, v in state.items() if k.endswith("weight") and v.ndim > 1)
    state[name] = state[name].clone()
    state[name].view(-1)[0] = math.inf
    weights = tmp_path / "inf.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(weights))
    run = tmp_path / "run"
    rc, err = wsld(capsys, "train", *CE_TINY, teacher_cache, f"model.student_weights={weights}", "--out", run)
    assert rc == 3
    line = error_line(err)
    assert "loss is not finite at epoch 1, step 1 (global step 1)" in line and "no checkpoint was written yet" in line
    assert not (run / "last.pt").exists()
    assert not (run / "summary.json").exists()


def test_nan_policy_skip_skips_the_steps_and_finishes_with_finite_weights(tmp_path, capsys, teacher_cache):
    run = tmp_path / "run"
    rc, err = wsld(
        capsys, "train", *CE_TINY, teacher_cache, "train.lr=1e4", "train.nan_policy=skip", "checkpoint.every_steps=1",
        "--out", run,
    )  # fmt: skip
    assert rc == 0, err
    assert "Traceback" not in err
    skipped = [r for r in records(run) if r["kind"] == "skipped_step"]
    summary = load_json(run / "summary.json")
    assert 0 < len(skipped) == summary["skipped_steps"] < summary["global_step"]
    assert f"non-finite loss at epoch 1, step {skipped[0]['step']}" in err
    ck = load(run / "last.pt")
    assert ck["skipped_steps"] == len(skipped)
    assert finite(ck["student"]), "skipped steps must leave the weights finite"


def load_json(path: Path) -> dict:
    import json

    return json.loads(path.read_text())


# --------------------------------------------------------------------------- run directory


def _assert_failed_before_training(err: str, run: Path, cache: Path) -> str:
    line = error_line(err)
    assert not (cache.exists() and any(cache.rglob("teacher.safetensors"))), "the teacher was trained before failing"
    assert not (cache.exists() and any(cache.rglob("last.pt"))), "the teacher was trained before failing"
    assert not any(r["kind"] == "train" for r in records(run)), "the student trained before failing"
    return line


def test_run_dir_under_a_regular_file_fails_before_any_training(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    cache = tmp_path / "cache"
    rc, err = wsld(capsys, "train", *WSLD_TINY, f"model.teacher_cache={cache}", "--out", blocker / "run")
    assert rc == 2
    line = _assert_failed_before_training(err, blocker / "run", cache)
    assert str(blocker) in line
    assert blocker.read_text() == "not a folder"


def test_read_only_filesystem_fails_before_any_training(tmp_path, capsys, tmpfs):
    ro = tmpfs("ro,size=1m")
    with pytest.raises(OSError):  # root cannot write there either
        (ro / "x").write_text("x")
    cache = tmp_path / "cache"
    rc, err = wsld(capsys, "train", *WSLD_TINY, f"model.teacher_cache={cache}", "--out", ro / "run")
    assert rc == 2
    line = _assert_failed_before_training(err, ro / "run", cache)
    assert "read-only" in line.lower() or "cannot" in line


def test_full_disk_fails_before_any_training_and_leaves_no_partial_file(tmp_path, capsys, tmpfs):
    small = tmpfs("size=64k")
    cache = tmp_path / "cache"
    rc, err = wsld(capsys, "train", *WSLD_TINY, f"model.teacher_cache={cache}", "--out", small / "run")
    assert rc == 2
    line = _assert_failed_before_training(err, small / "run", cache)
    assert "No space left on device" in line and "free space or choose another --out" in line
    leftovers = [p for p in small.rglob("*") if p.is_file()]
    assert not any(p.name.startswith(".") for p in leftovers), f"probe or temp file left behind: {leftovers}"
    if (small / "run").is_dir():
        final_files_loadable(small / "run")


# --------------------------------------------------------------------------- safe loading


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    """A real finished run (CE, no teacher): its last.pt is the good checkpoint to damage."""
    run = tmp_path_factory.mktemp("finished") / "run"
    cache = run.parent / "cache"
    assert main(["train", *CE_TINY, f"model.teacher_cache={cache}", "--out", str(run)]) == 0
    return run


class _Payload:
    """Unpickling this runs ``os.mkdir(marker)``: the shape of a malicious checkpoint."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def _evil_checkpoint(path: Path, marker: Path, base: dict) -> Path:
    """A file torch.load would accept without weights_only: a real checkpoint plus a code payload."""
    state = dict(base)
    state["student"] = dict(base["student"])
    state["extra"] = _Payload(marker)
    torch.save(state, path)
    # sanity: the payload really runs under plain pickle (so refusing it is what the test checks)
    probe = path.parent / f"probe-{uuid.uuid4().hex}"
    pickle.loads(pickle.dumps(_Payload(probe)))
    assert probe.is_dir()
    probe.rmdir()
    return path


@pytest.mark.parametrize("where", ["eval", "resume", "student_weights", "teacher_weights"])
def test_a_checkpoint_carrying_code_is_refused_and_never_run(tmp_path, capsys, finished_run, where):
    marker = tmp_path / "PWNED"
    good = load(finished_run / "last.pt")
    if where == "resume":
        run = tmp_path / "run"
        run.mkdir()
        (run / "config.yaml").write_bytes((finished_run / "config.yaml").read_bytes())
        evil = _evil_checkpoint(run / "last.pt", marker, good)
        rc, err = wsld(capsys, "train", "--resume", run)
    else:
        evil = _evil_checkpoint(tmp_path / "evil.pt", marker, good)
        if where == "eval":
            rc, err = wsld(capsys, "eval", evil)
        elif where == "student_weights":
            rc, err = wsld(capsys, "train", *CE_TINY, f"model.student_weights={evil}", "--out", tmp_path / "r")
        else:
            rc, err = wsld(
                capsys, "train", *WSLD_TINY, f"model.teacher_weights={evil}", f"model.teacher_cache={tmp_path / 'c'}",
                "--out", tmp_path / "r",
            )  # fmt: skip
    assert rc == 2
    line = error_line(err)
    assert str(evil) in line and "weights_only" in line or "not a loadable" in line, line
    assert not marker.exists(), "loading the checkpoint ran code from it"


@pytest.mark.parametrize("cut", [0, 100, 0.5])
def test_a_truncated_checkpoint_is_a_clear_error(tmp_path, capsys, finished_run, cut):
    data = (finished_run / "last.pt").read_bytes()
    n = int(len(data) * cut) if isinstance(cut, float) else cut
    bad = tmp_path / "last.pt"
    bad.write_bytes(data[:n])
    rc, err = wsld(capsys, "eval", bad)
    assert rc == 2
    assert str(bad) in error_line(err)
    # the same file as a run's last.pt: --resume refuses it rather than starting over
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_bytes((finished_run / "config.yaml").read_bytes())
    (run / "last.pt").write_bytes(data[:n])
    rc, err = wsld(capsys, "train", "--resume", run)
    assert rc == 2
    assert str(run / "last.pt") in error_line(err)
    assert (run / "last.pt").read_bytes() == data[:n], "the damaged checkpoint was overwritten"


# --------------------------------------------------------------------------- hostile configs


@pytest.mark.parametrize(
    "yaml_text, expect",
    [
        ("train:\n  epochs: 2\n  epochz: 3\n", "train.epochz"),
        ("trian:\n  epochs: 2\n", "trian"),
        ("train:\n  epochs: ten\n", "train.epochs"),
        ("data:\n  batch_size: [1, 2]\n", "data.batch_size"),
        ("train:\n  epochs: -1\n", "train.epochs"),
        ("train: [1, 2\n", "bad.yaml, line 2, column 1: YAML syntax error"),
        ("data:\n\tbatch_size: 3\n", "bad.yaml, line 2, column 1: YAML syntax error: found character that cannot start any token (a tab"),
        ("data:\n  batch_size: 3\n   workers: 2\n", "bad.yaml, line 3, column 11: YAML syntax error: mapping values are not allowed"),
        ("- just\n- a list\n", "mapping"),
    ],
)
def test_a_bad_config_file_is_one_line_naming_the_key(tmp_path, capsys, yaml_text, expect):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(yaml_text)
    rc, err = wsld(capsys, "train", cfg, "--out", tmp_path / "run")
    assert rc == 2
    assert expect in error_line(err)
    assert not (tmp_path / "run").exists(), "a run directory was created for a config that does not load"


def test_a_config_carrying_python_code_is_refused(tmp_path, capsys):
    marker = tmp_path / "PWNED"
    cfg = tmp_path / "evil.yaml"
    cfg.write_text(f"train: !!python/object/apply:os.mkdir ['{marker}']\n")
    rc, err = wsld(capsys, "train", cfg, "--out", tmp_path / "run")
    assert rc == 2
    assert str(cfg) in error_line(err)
    assert not marker.exists()
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("override, expect", [("train.epochz=3", "train.epochz"), ("train.epochs=ten", "train.epochs")])
def test_a_bad_override_is_one_line_naming_the_key(tmp_path, capsys, override, expect):
    rc, err = wsld(capsys, "train", override, "--out", tmp_path / "run")
    assert rc == 2
    assert expect in error_line(err)
