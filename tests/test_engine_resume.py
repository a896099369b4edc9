"""Exact resume: a run stopped abruptly mid-epoch (``WSLD_STOP_AFTER_STEPS``, an ``os._exit`` like a
crash) and continued with ``wsld train --resume`` ends with bit-identical weights, optimizer state,
EMA and metrics to an uninterrupted run (CPU, deterministic mode)."""

from __future__ import annotations

import shutil

import pytest
import torch
from engine_helpers import (  # noqa: F401  (digits_teacher is a fixture)
    TINY, WSLD, comparable, digits_teacher, load_ck, one_error_line, records, run_cli, run_sub, sub_env,
)

from wsld.engine.hooks import STOP_AFTER_STEPS_ENV, STOP_EXIT_CODE


def _assert_same_state(a: dict, b: dict, what: str) -> None:
    assert a.keys() == b.keys(), what
    for k in a:
        assert torch.equal(a[k], b[k]), f"{what}: {k} differs"


def _same_optimizer(a: dict, b: dict) -> None:
    assert a["state"].keys() == b["state"].keys()
    for i in a["state"]:
        _assert_same_state(a["state"][i], b["state"][i], f"optimizer state {i}")


@pytest.fixture(scope="module")
def runs(digits_teacher, tmp_path_factory):  # noqa: F811
    base = tmp_path_factory.mktemp("resume")
    args = [*TINY, f"model.teacher_weights={digits_teacher}", f"model.teacher_cache={base / 'cache'}",
            "train.deterministic=true", "train.ema_decay=0.8", "checkpoint.every_steps=3"]  # fmt: skip
    rc, _, err = run_cli(["train", *args, "--out", str(base / "whole")])
    assert rc == 0, err
    # 10 steps per epoch; checkpoints at global steps 3, 6, 9, 12, ...: stop after 14 (epoch 2, step 4)
    crashed = run_sub([*WSLD, "train", *args, "--out", str(base / "split")], env=sub_env(**{STOP_AFTER_STEPS_ENV: "14"}))
    assert crashed.returncode == STOP_EXIT_CODE, crashed.stderr
    mid = load_ck(base / "split" / "last.pt")
    assert not (base / "split" / "summary.json").exists()
    rc, out, err = run_cli(["train", "--resume", str(base / "split")])
    assert rc == 0, err
    return base / "whole", base / "split", mid, out


def test_stopped_run_left_a_mid_epoch_checkpoint(runs):
    _, _, mid, _ = runs
    assert (mid["epoch"], mid["step_in_epoch"], mid["global_step"]) == (1, 2, 12)
    assert mid["epoch_stats"] is not None  # the partial epoch's running sums travel with it


def test_resumed_run_is_bit_identical_to_the_uninterrupted_one(runs):
    whole, split, _, out = runs
    a, b = load_ck(whole / "last.pt"), load_ck(split / "last.pt")
    _assert_same_state(a["student"], b["student"], "student")
    _assert_same_state(a["ema"], b["ema"], "EMA")
    _same_optimizer(a["optimizer"], b["optimizer"])
    assert a["global_step"] == b["global_step"] == 20
    _assert_same_state(load_ck(whole / "best.pt")["student"], load_ck(split / "best.pt")["student"], "best.pt")
    assert "wsld result" in out


def test_resumed_metrics_have_no_missing_or_duplicated_records(runs):
    whole, split, _, _ = runs
    got, want = records(split), records(whole)
    assert [r["kind"] for r in got].count("resume") == 1
    assert [r["epoch"] for r in got if r["kind"] == "eval"] == [1, 2]
    assert comparable(got) == comparable(want)  # same losses, lrs, accuracies, in the same order


def test_resume_refuses_a_changed_key_that_matters(runs, tmp_path):
    split = tmp_path / "copy"
    shutil.copytree(runs[1], split)
    rc, _, err = run_cli(["train", "--resume", str(split), "distill.T=3"])
    assert rc == 2 and "distill.T" in one_error_line(err)
    # keys that do not change the result may change
    rc, _, err = run_cli(["train", "--resume", str(split), "data.workers=0", "train.log_every=7"])
    assert rc == 0, err
