"""Two processes with gloo on CPU, launched by torchrun exactly as users launch 8 GPUs
(``python -m torch.distributed.run --nproc_per_node=2 --standalone -m wsld train ...``).

Checks: the 2-process run, stopped mid-epoch and resumed under DDP, ends with the same student as a
1-process run of the same global batch; metrics are reduced over ranks; only rank 0 writes files.

Tolerance: 1e-5 absolute on every weight. The student (cnn_student) has no BatchNorm and the
teacher runs in eval mode, so each sample's loss does not depend on how the batch is split; the
only difference is float32 summation order (mean of two half-batch means after the gradient
all-reduce vs one full-batch mean), about 1e-7 relative per step, which 20 SGD steps keep far below
1e-5 (observed: ~3e-8). A wrong sharding, a missing all-reduce or a bad resume moves weights by
1e-3 or more.
"""

from __future__ import annotations

import sys

import pytest
from engine_helpers import TINY, comparable, digits_teacher, load_ck, records, run_cli, run_sub, sub_env  # noqa: F401

from wsld.engine.hooks import STOP_AFTER_STEPS_ENV

TOLERANCE = 1e-5
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone", "-m", "wsld"]


@pytest.fixture(scope="module")
def runs(digits_teacher, tmp_path_factory):  # noqa: F811
    base = tmp_path_factory.mktemp("ddp")
    args = [*TINY, f"model.teacher_weights={digits_teacher}", f"model.teacher_cache={base / 'cache'}",
            "train.deterministic=true", "checkpoint.every_steps=4", "data.val_batch_size=100"]  # fmt: skip
    rc, _, err = run_cli(["train", *args, "--out", str(base / "one")])
    assert rc == 0, err
    # 2 processes x 64 = the same global batch of 128; stop both ranks after global step 14
    crashed = run_sub([*TORCHRUN, "train", *args, "--out", str(base / "two")], env=sub_env(**{STOP_AFTER_STEPS_ENV: "14"}))
    assert crashed.returncode != 0, crashed.stderr
    mid = load_ck(base / "two" / "last.pt")
    files_after_crash = sorted(p.relative_to(base / "two").as_posix() for p in (base / "two").rglob("*"))
    resumed = run_sub([*TORCHRUN, "train", "--resume", str(base / "two")])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    return base / "one", base / "two", mid, files_after_crash, resumed.stdout


def test_two_processes_train_the_same_student_as_one(runs):
    one, two, mid, _, _ = runs
    a, b = load_ck(one / "last.pt")["student"], load_ck(two / "last.pt")["student"]
    assert a.keys() == b.keys()
    for k in a:
        diff = (a[k] - b[k]).abs().max().item()
        assert diff < TOLERANCE, f"{k}: max difference {diff:.2e}"
    # the last 8 steps alone move the weights by far more than the tolerance: the check has teeth
    assert max((a[k] - mid["student"][k]).abs().max().item() for k in a) > 100 * TOLERANCE


def test_resume_under_ddp_continues_from_the_mid_epoch_checkpoint(runs):
    _, two, mid, _, _ = runs
    assert (mid["epoch"], mid["step_in_epoch"], mid["global_step"], mid["world_size"]) == (1, 2, 12, 2)
    assert len(mid["rng"]) == 2 and len(mid["epoch_stats"]) == 2  # per-rank state gathered to rank 0
    recs = records(two)
    assert [r["kind"] for r in recs].count("resume") == 1
    assert [r["epoch"] for r in recs if r["kind"] == "eval"] == [1, 2]
    assert load_ck(two / "last.pt")["global_step"] == 20


def test_metrics_are_reduced_over_ranks(runs):
    one, two, _, _, _ = runs
    got = [r for r in comparable(records(two)) if r["kind"] in ("train", "eval", "teacher_eval")]
    want = [r for r in comparable(records(one)) if r["kind"] in ("train", "eval", "teacher_eval")]
    assert [(r["kind"], r["global_step"]) for r in got] == [(r["kind"], r["global_step"]) for r in want]
    for g, w in zip(got, want):
        if g["kind"] == "train":  # the global batch's mean, not rank 0's half
            for field in ("loss", "hard", "soft", "weight_mean"):
                assert g[field] == pytest.approx(w[field], rel=1e-5), (field, g, w)
        else:  # every val image counted once, over both ranks
            assert g["count"] == w["count"] == 450
            assert abs(g["top1"] - w["top1"]) <= 100 / 450  # at most one image on the other side of a tie


def test_only_rank_zero_writes_files(runs):
    _, two, _, files_after_crash, stdout = runs
    assert len(list((two / "tb").glob("events.out.tfevents.*"))) == 2  # rank 0: first run + resumed run
    assert len([f for f in files_after_crash if f.startswith("tb/")]) == 1
    assert sorted(p.name for p in two.iterdir()) == ["best.pt", "config.yaml", "last.pt", "log.txt", "metrics.jsonl", "run.json", "summary.json", "tb"]
    assert stdout.count("wsld result") == 1  # the report is printed by rank 0 only
    # log.txt holds rank 0's console only: one start line per command (the crashed one, the resume), one report
    log = (two / "log.txt").read_text()
    assert log.count("# wsld train") == 2 and log.count("[wsld] student: cnn_student") == 2 and log.count("wsld result") == 1
    # one writer: each metrics line is whole JSON and no record is written twice
    recs = records(two)
    steps = [r["global_step"] for r in recs if r["kind"] == "train"]
    assert steps == sorted(set(steps))
