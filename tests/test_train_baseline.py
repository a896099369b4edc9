"""`wsld train --baseline` (on by default for the built-in run): the student alone next to the distilled one."""

from __future__ import annotations

import json
import shutil

from engine_helpers import TINY

from wsld.cli import main


def test_baseline_trains_the_student_alone_and_prints_both(tmp_path, capsys):
    run = tmp_path / "run"
    args = ["train", *TINY, "train.epochs=1", f"model.teacher_cache={tmp_path / 'c'}", "--baseline", "--out", str(run)]
    assert main(args) == 0
    out = capsys.readouterr().out
    ce = json.loads((tmp_path / "run-ce" / "summary.json").read_text())
    wsld = json.loads((run / "summary.json").read_text())
    assert ce["loss"] == "ce" and ce["teacher"] is None and ce["epochs"] == wsld["epochs"]
    assert "teacher cnn_teacher" in out and "student alone (CE)" in out
    gap = [ln for ln in out.splitlines() if ln.strip().startswith("wsld - CE:")]
    assert len(gap) == 1 and f"wsld - CE: {wsld['last_top1'] - ce['last_top1']:+.2f} points" in gap[0], out
    # the one-seed difference says what it is not: no interval, CE at WSLD's rate, not the method's gain
    assert "one seed" in gap[0] and "CE at wsld's learning rate (train.lr 0.1)" in gap[0] and "not the method's gain" in gap[0]


def test_no_baseline_unless_asked_for_a_config_run(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", *TINY, "train.epochs=1", f"model.teacher_cache={tmp_path / 'c'}", "--out", str(run)]) == 0
    assert "student alone" not in capsys.readouterr().out and not (tmp_path / "run-ce").exists()


def test_a_finished_baseline_is_reused_and_another_run_there_is_refused(tmp_path, capsys):
    args = [*TINY, "train.epochs=1", f"model.teacher_cache={tmp_path / 'c'}", "--baseline"]
    assert main(["train", *args, "--out", str(tmp_path / "run")]) == 0
    ce = tmp_path / "run-ce" / "summary.json"
    before = ce.read_text()
    # a second distilled run whose RUN_DIR-ce is this finished baseline: reused as it is
    shutil.copytree(tmp_path / "run-ce", tmp_path / "run2-ce")
    capsys.readouterr()
    assert main(["train", *args, "--out", str(tmp_path / "run2")]) == 0
    assert "student alone (CE)" in capsys.readouterr().out and ce.read_text() == before
    # a folder of that name holding some other run is left alone and named
    (tmp_path / "run3-ce").mkdir()
    (tmp_path / "run3-ce" / "summary.json").write_text(json.dumps({"loss": "kd", "student": "cnn_student", "epochs": 1}))
    assert main(["train", *args, "--out", str(tmp_path / "run3")]) == 2
    assert "holds another finished run" in capsys.readouterr().err
    assert not (tmp_path / "run3").exists()  # refused before anything was trained


def test_a_baseline_killed_after_its_first_checkpoint_resumes(tmp_path):
    """The baseline's CE config is built in code from the distilled run's; a rerun resumes it from
    its checkpoint (the checkpoint's config and the rebuilt one compare in one resolved form)."""
    import os
    import subprocess
    import sys

    script = (
        "import sys; from pathlib import Path; sys.path.insert(0, sys.argv[1])\n"
        "from engine_helpers import TINY\n"
        "from wsld.config import load_config\n"
        "from wsld.commands.train import train_baseline\n"
        "cfg = load_config(None, TINY + ['model.teacher_cache=' + sys.argv[2]])\n"
        "print('top1', train_baseline(cfg, Path(sys.argv[3]))['last_top1'])\n"
    )
    argv = [sys.executable, "-c", script, os.path.dirname(__file__), str(tmp_path / "c"), str(tmp_path / "run")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    killed = subprocess.run(argv, env={**env, "WSLD_STOP_AFTER_STEPS": "12"}, capture_output=True, text=True, timeout=300)
    assert killed.returncode != 0 and (tmp_path / "run-ce" / "last.pt").is_file(), killed.stderr[-2000:]
    again = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "resuming" in again.stderr and "top1" in again.stdout
