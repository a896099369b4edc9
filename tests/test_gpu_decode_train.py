"""data.decode=gpu through the whole engine, with the decoder on the CPU device (CI has no GPU):
training, evaluation, a teacher, the summary's decode counts, and an exact resume."""

from __future__ import annotations

import json

import torch
from data_fixtures import image_tree  # noqa: F401
from reliability_helpers import WSLD, assert_same_tensors, load, run_to_end, sub_env

from wsld.cli import main


def _args(tree, cache) -> list[str]:
    return [
        "data.format=folder", f"data.data_path={tree.root}", "data.dataset=photos", "data.image_size=32",
        "data.val_resize=36", "data.batch_size=4", "data.workers=0", "train.progress=false", "train.epochs=2",
        "model.teacher=cnn_student", "teacher_train.epochs=1", f"model.teacher_cache={cache}", "data.decode=gpu",
        "train.log_every=1", "checkpoint.every_steps=2", "distill.allow_weak_teacher=true",
    ]  # fmt: skip


def test_decode_gpu_trains_distils_and_evaluates_end_to_end(image_tree, tmp_path, capsys):  # noqa: F811
    run = tmp_path / "run"
    assert main(["train", *_args(image_tree, tmp_path / "cache"), "--out", str(run)]) == 0
    s = json.loads((run / "summary.json").read_text())
    assert s["decode"] == "gpu" and s["teacher_top1"] is not None
    counts = s["decode_counts"]
    assert counts["device"] > 0 and counts["cpu_worker"] > 0  # JPEGs on the device, PNG/CMYK in the workers
    assert s["corrupt_images"] > 0  # the truncated and fake files, each time they came up
    start = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()][0]
    assert start["decode"] == "gpu"


def test_decode_gpu_run_killed_then_resumed_is_bit_identical(image_tree, tmp_path):  # noqa: F811
    args = _args(image_tree, tmp_path / "cache")
    want, got = tmp_path / "want", tmp_path / "got"
    assert run_to_end([*WSLD, "train", *args, "--out", str(want)], tmp_path / "w.log").returncode == 0, (tmp_path / "w.log").read_text()
    p = run_to_end([*WSLD, "train", *args, "--out", str(got)], tmp_path / "1.log", env=sub_env(WSLD_STOP_AFTER_STEPS="4"))
    assert p.returncode == 99, (tmp_path / "1.log").read_text()
    assert run_to_end([*WSLD, "train", "--resume", str(got)], tmp_path / "2.log").returncode == 0, (tmp_path / "2.log").read_text()
    assert_same_tensors(load(got / "last.pt")["student"], load(want / "last.pt")["student"], "student")
    assert torch.equal(load(got / "last.pt")["optimizer"]["state"][0]["momentum_buffer"], load(want / "last.pt")["optimizer"]["state"][0]["momentum_buffer"])
