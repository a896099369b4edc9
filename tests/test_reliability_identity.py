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
from reliability_helpers import TINY, WSLD, assert_same_run, load, records, run_to_end, sub_env
from safetensors.torch import load_file, save_file

from wsld.cli import main


def wsld(capsys, *argv) -> tuple[int, str, str]:
    """The CLI in this process: (exit code, stdout, stderr)."""
    capsys.readouterr()
    rc = main([str(a) for a in argv])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def error_line(err: str) -> str:
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("wsld: error:")]
    assert len(lines) == 1, err
    return lines[0]


def _start(cmd: list[str], log: Path, **env: str) -> subprocess.Popen:
    with open(log, "wb") as out:
        return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=sub_env(**env), start_new_session=True)


def _wait_for(pred, p: subprocess.Popen, log: Path, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if p.poll() is not None:
            raise AssertionError(f"ended (exit {p.returncode}) too early:\n{log.read_text(errors='replace')[-3000:]}")
        assert time.monotonic() < deadline, log.read_text(errors="replace")[-3000:]
        time.sleep(0.02)


def _finish(p: subprocess.Popen) -> None:
    if p.poll() is None:
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()


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
    p = _start([*WSLD, "train", *args, "--out", str(run)], log, WSLD_TEST_SLOW_EVAL="0.3")
    try:
        # the teacher's last step is logged at the end of its epoch, just before its evaluation
        _wait_for(lambda: any(r["kind"] == "train" and r["global_step"] == 21 for r in records(_teacher_run(cache))), p, log)
        os.killpg(p.pid, signal.SIGTERM)
        rc = p.wait(timeout=120)
    finally:
        _finish(p)
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
    a = _start([*WSLD, "train", *TINY, "train.epochs=1", f"model.teacher_cache={tmp_path / 'ca'}", "--out", str(run)], log,
               WSLD_TEST_SLOW_STEP="0.2")  # fmt: skip
    try:
        _wait_for(lambda: bool(records(_teacher_run(tmp_path / "ca"))), a, log)  # a is in its teacher phase
        t0 = time.monotonic()
        b = subprocess.run([*WSLD, "train", *TINY, "train.epochs=1", f"model.teacher_cache={tmp_path / 'cb'}", "--out", str(run)],
                           capture_output=True, text=True, env=sub_env(), timeout=120)  # fmt: skip
        took = time.monotonic() - t0
        assert a.poll() is None  # the first run goes on undisturbed
    finally:
        _finish(a)
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
