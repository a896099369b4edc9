"""Shared pieces of the engine tests (tests/test_engine_*.py, tests/test_cli_*.py).

Runs are tiny and deterministic: the built-in ``digits`` data (8x8 images), one CPU thread,
``data.workers=0``, no progress bars. A teacher is trained once per session (one epoch of CE) and
passed to runs as ``model.teacher_weights``, so most tests train only the student.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Optional

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
WSLD = [sys.executable, "-m", "wsld"]

# 1,347 train images / 128 = 10 steps per epoch
TINY = [
    "data.dataset=digits", "data.batch_size=128", "data.workers=0", "train.progress=false",
    "train.epochs=2", "teacher_train.epochs=2", "teacher_train.lr=0.2", "train.log_every=4", "train.base_batch_size=64",
    "train.lr=0.1",
    # the models and loss settings these tests were written for, pinned so a new built-in default does not change them
    "model.teacher=cnn_teacher", "model.student=cnn_student", "distill.T=4.0", "distill.alpha=2.25",
]  # fmt: skip

# metric fields that depend on wall-clock time or on the run's folder
TIMING_FIELDS = ("time", "img_per_s", "data_wait_frac", "run_dir")


@pytest.fixture(scope="session")
def digits_teacher(tmp_path_factory) -> str:
    """A cnn_teacher trained for two epochs on digits (about 87% top-1) (through the engine's own teacher training)."""
    from wsld.config import load_config
    from wsld.runtime import Runtime
    from wsld.teachers.training import ensure_teacher

    cache = tmp_path_factory.mktemp("engine_teacher_cache")
    cfg = load_config(None, TINY + [f"model.teacher_cache={cache}"])
    return ensure_teacher(cfg, Runtime(torch.device("cpu")), lambda msg: None)


def run_cli(argv: list[str]) -> tuple[int, str, str]:
    """``wsld.cli.main(argv)`` in this process; returns (exit code, stdout, stderr)."""
    from wsld.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = main(argv)
        except SystemExit as e:  # argparse usage errors
            rc = int(e.code or 0)
    return rc, out.getvalue(), err.getvalue()


def sub_env(**extra: str) -> dict[str, str]:
    """Environment for a `wsld` subprocess: one thread, no inherited test hooks."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("WSLD_STOP") and not k.startswith("WSLD_TEST_SLOW")}
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = str(REPO / "src") + os.pathsep + env.get("PYTHONPATH", "")
    env.update(extra)
    return env


def run_sub(argv: list[str], *, env: Optional[dict[str, str]] = None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(argv, env=env or sub_env(), cwd=REPO, capture_output=True, text=True, timeout=timeout)


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def comparable(recs: list[dict]) -> list[dict]:
    """Metrics records without timing/folder fields and without the marker a resume adds."""
    out = []
    for r in recs:
        if r["kind"] == "resume":
            continue
        out.append({k: v for k, v in r.items() if k not in TIMING_FIELDS})
    return out


def load_ck(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def one_error_line(err: str) -> str:
    """The stderr of a refused command must be exactly one 'wsld: error: ...' line."""
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one line, got:\n{err}"
    assert lines[0].startswith("wsld: error: "), lines[0]
    assert "Traceback" not in err
    return lines[0]
