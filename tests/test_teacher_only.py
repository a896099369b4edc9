"""wsld train --teacher-only: the config's teacher as a run of its own, labelled a teacher, then distilled from."""

from __future__ import annotations

import json

from engine_helpers import TINY, run_cli


def test_teacher_only_then_distil(tmp_path):
    teach = tmp_path / "teacher"
    rc, out, err = run_cli(["train", *TINY, "--teacher-only", "--out", str(teach)])
    assert rc == 0, err
    weights = teach / "teacher.safetensors"
    assert weights.is_file()
    assert "wsld result: teacher cnn_teacher trained from scratch with CE, 2 epochs" in out
    assert f"distil from it: wsld train CONFIG {' '.join(TINY)} model.teacher_weights={weights}" in out  # the same data and models
    assert "teacher epoch 2/2" in err and "student epoch" not in err
    start = json.loads((teach / "metrics.jsonl").read_text().splitlines()[0])
    assert (start["kind"], start["role"], start["student"]) == ("start", "teacher", "cnn_teacher")
    summary = json.loads((teach / "summary.json").read_text())
    assert summary["role"] == "teacher"
    # the weights distil as a file teacher; the teacher's val top-1 is evaluated again from the file
    rc, out, err = run_cli(["train", *TINY, "train.epochs=1", f"model.teacher_weights={weights}", "--out", str(tmp_path / "s")])
    assert rc == 0, err
    assert f"teacher {'cnn_teacher':<14} top-1 {summary['last_top1']:6.2f}" in out, out


def test_teacher_only_refuses_what_has_no_meaning(tmp_path):
    rc, _, err = run_cli(["train", *TINY, "--teacher-only", "--baseline", "--out", str(tmp_path / "t")])
    assert rc == 2 and "--baseline" in err and not (tmp_path / "t").exists()
