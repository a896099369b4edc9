"""Kill -9 a training run at chosen moments, resume it, and get exactly the uninterrupted result.

Each interrupted run is a real ``wsld train`` process (or torchrun with 2 gloo processes) killed with
SIGKILL: mid-epoch between two checkpoints, half-way through writing a checkpoint
(``WSLD_TEST_SLOW_SAVE``), and during evaluation (``WSLD_TEST_SLOW_EVAL``). After
``wsld train --resume`` the final weights, optimizer state, metrics log and summary must equal those
of a run that was never interrupted, bit for bit (CPU, deterministic).
"""

from __future__ import annotations

import hashlib
import signal
from pathlib import Path

import pytest

from reliability_helpers import (
    TINY, TORCHRUN_2, WSLD, assert_same_run, final_files_loadable, load, run_and_kill, run_to_end, sub_env, watch,
    worker_with_rank,
)  # fmt: skip


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _tmp_files(run_dir: Path) -> list[Path]:
    return sorted(run_dir.glob(".*.tmp")) if run_dir.exists() else []


def _train_reached(run_dir: Path, global_step: int):
    return watch(run_dir, lambda recs: any(r["kind"] == "train" and r["global_step"] >= global_step for r in recs))


def _half_written_checkpoint(run_dir: Path):
    """True while a checkpoint temp file exists with some (not yet all) of its bytes."""

    def check() -> bool:
        return any(t.name.startswith(".last.pt.") and t.stat().st_size > 0 for t in _tmp_files(run_dir))

    return check


def _in_eval_of_epoch(run_dir: Path, epoch: int):
    """The epoch's training is logged (class_weights record) but its eval record is not there yet."""
    return watch(
        run_dir,
        lambda recs: any(r["kind"] == "class_weights" and r["epoch"] == epoch for r in recs)
        and not any(r["kind"] == "eval" and r["epoch"] == epoch for r in recs),
    )


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> str:
    return f"model.teacher_cache={tmp_path_factory.mktemp('teacher_cache')}"


@pytest.fixture(scope="module")
def baseline(tmp_path_factory, cache) -> Path:
    """One uninterrupted 3-epoch run (it also trains and caches the teacher the other runs reuse)."""
    run = tmp_path_factory.mktemp("baseline") / "run"
    p = run_to_end([*WSLD, "train", *TINY, cache, "train.epochs=3", "--out", str(run)], run.parent / "log.txt")
    assert p.returncode == 0, (run.parent / "log.txt").read_text()
    return run


def test_kill9_at_four_points_then_resume_is_bit_exact(tmp_path, cache, baseline):
    run = tmp_path / "run"
    args = [*TINY, cache, "train.epochs=3"]

    # 1. kill -9 before the first checkpoint (step 8): --resume finds none and starts over
    rc = run_and_kill([*WSLD, "train", *args, "--out", str(run)], tmp_path / "1.log", _train_reached(run, 4))
    assert rc == -signal.SIGKILL
    assert not (run / "last.pt").exists() and not (run / "summary.json").exists()
    final_files_loadable(run)

    # 2. kill -9 mid-epoch 2, between the checkpoints at global steps 24 and 32
    rc = run_and_kill([*WSLD, "train", "--resume", str(run)], tmp_path / "2.log", _train_reached(run, 28))
    assert rc == -signal.SIGKILL
    assert "holds no checkpoint yet" in (tmp_path / "2.log").read_text()
    ck = load(run / "last.pt")
    assert ck["epoch"] == 1 and 0 < ck["step_in_epoch"] < 21, "the kill was meant to land mid-epoch 2"
    assert not (run / "summary.json").exists()
    final_files_loadable(run)
    before = _sha(run / "last.pt")

    # 3. resume, kill -9 half-way through writing the next checkpoint: last.pt is untouched
    rc = run_and_kill(
        [*WSLD, "train", "--resume", str(run)], tmp_path / "3.log", _half_written_checkpoint(run),
        env=sub_env(WSLD_TEST_SLOW_SAVE="1.5"),
    )  # fmt: skip
    assert rc == -signal.SIGKILL
    assert _sha(run / "last.pt") == before, "an interrupted checkpoint write changed last.pt"
    assert _tmp_files(run), "the half-written checkpoint should be a dot-prefixed temp file"
    final_files_loadable(run)

    # 4. resume, kill -9 while the student is evaluated after epoch 2
    rc = run_and_kill(
        [*WSLD, "train", "--resume", str(run)], tmp_path / "4.log", _in_eval_of_epoch(run, 2),
        env=sub_env(WSLD_TEST_SLOW_EVAL="0.2"),
    )  # fmt: skip
    assert rc == -signal.SIGKILL
    assert not (run / "summary.json").exists()
    final_files_loadable(run)

    # 5. resume to the end: same weights, optimizer, metrics log and summary as never interrupted
    p = run_to_end([*WSLD, "train", "--resume", str(run)], tmp_path / "5.log")
    out = (tmp_path / "5.log").read_text()
    assert p.returncode == 0 and "Traceback" not in out, out
    resumes = assert_same_run(run, baseline)
    # one resume record per resume whose work survived: run 4 from step 24, run 5 from step 40
    # (run 3's record went with the rest of its lost work)
    assert [r["global_step"] for r in resumes] == [24, 40]
    assert not _tmp_files(run), f"stale temp files left in the run directory: {_tmp_files(run)}"
    final_files_loadable(run)


@pytest.fixture(scope="module")
def ddp_baseline(tmp_path_factory, cache, baseline) -> Path:
    run = tmp_path_factory.mktemp("ddp_baseline") / "run"
    p = run_to_end([*TORCHRUN_2, "train", *TINY, cache, "train.epochs=1", "--out", str(run)], run.parent / "log.txt")
    assert p.returncode == 0, (run.parent / "log.txt").read_text()
    return run


def test_kill9_under_torchrun_2_processes_then_resume_is_bit_exact(tmp_path, cache, ddp_baseline):
    """Rank 0 (the only writer) is killed half-way through a mid-epoch checkpoint; torchrun stops
    rank 1; the resumed 2-process run ends exactly like the uninterrupted one."""
    run = tmp_path / "run"
    args = [*TINY, cache, "train.epochs=1"]
    seen = {}

    def second_checkpoint_half_written() -> bool:  # the write at step 16, last.pt holds step 8
        if (run / "last.pt").exists() and "sha" not in seen:
            seen["sha"] = _sha(run / "last.pt")
        return "sha" in seen and _half_written_checkpoint(run)()

    rc = run_and_kill(
        [*TORCHRUN_2, "train", *args, "--out", str(run)], tmp_path / "1.log", second_checkpoint_half_written,
        env=sub_env(WSLD_TEST_SLOW_SAVE="1.5"), victims=lambda pid: [worker_with_rank(pid, 0)],
    )  # fmt: skip
    assert rc != 0
    assert _sha(run / "last.pt") == seen["sha"], "an interrupted checkpoint write changed last.pt"
    ck = load(run / "last.pt")
    assert ck["world_size"] == 2 and (ck["epoch"], ck["step_in_epoch"], ck["global_step"]) == (0, 8, 8)
    final_files_loadable(run)

    p = run_to_end([*TORCHRUN_2, "train", "--resume", str(run)], tmp_path / "2.log")
    assert p.returncode == 0, (tmp_path / "2.log").read_text()
    resumes = assert_same_run(run, ddp_baseline)
    assert [(r["global_step"], r["world_size"]) for r in resumes] == [(8, 2)]
    assert not _tmp_files(run)
