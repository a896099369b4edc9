"""End-to-end training runs on real data: run-directory contents, logged metrics, training options,
the final report, and ``wsld eval``."""

from __future__ import annotations

import io
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from engine_helpers import TINY, digits_teacher, load_ck, one_error_line, records, run_cli  # noqa: F401
from torch import nn

from wsld.config import load_config
from wsld.engine.optim import lr_factor
from wsld.engine.step import StepContext, train_step
from wsld.run import build_trainer
from wsld.runtime import Runtime
from wsld.teachers.live import set_teacher_bn_mode
from wsld.losses.registry import DistillLoss


@pytest.fixture(scope="module")
def cli_run(digits_teacher, tmp_path_factory):  # noqa: F811
    """One WSLD run through the CLI (EMA on), shared by the report / files / eval tests."""
    base = tmp_path_factory.mktemp("cli_run")
    run_dir = base / "run"
    argv = ["train", *TINY, f"model.teacher_weights={digits_teacher}", f"model.teacher_cache={base / 'cache'}",
            "train.ema_decay=0.9", "--out", str(run_dir), "checkpoint.every_steps=3"]  # fmt: skip
    rc, out, err = run_cli(argv)
    assert rc == 0, err
    return run_dir, out, err


def test_run_directory_layout_and_checkpoint_contents(cli_run):
    run_dir, _, _ = cli_run
    names = {p.name for p in run_dir.iterdir()}
    assert {"config.yaml", "metrics.jsonl", "tb", "last.pt", "best.pt", "summary.json"} <= names
    assert not [n for n in names if n.endswith(".tmp") or n.startswith(".")]  # no temp files left
    assert list((run_dir / "tb").glob("events.out.tfevents.*"))
    cfg = load_config(run_dir / "config.yaml")  # the resolved config loads back as a config
    assert cfg.train.ema_decay == 0.9 and cfg.checkpoint.every_steps == 3
    ck = load_ck(run_dir / "last.pt")  # weights_only=True
    for key in ("student", "optimizer", "scheduler", "ema", "epoch", "step_in_epoch", "global_step", "rng", "config",
                "best_top1", "best_epoch", "teacher_eval"):  # fmt: skip
        assert key in ck, key
    assert (ck["epoch"], ck["step_in_epoch"], ck["global_step"]) == (2, 0, 20)
    assert set(ck["rng"][0]) >= {"python", "numpy", "torch"}
    assert ck["optimizer"]["state"], "momentum buffers are saved"


def test_metrics_and_tensorboard_hold_what_users_look_at(cli_run):
    run_dir, _, _ = cli_run
    recs = records(run_dir)
    kinds = [r["kind"] for r in recs]
    assert kinds[0] == "start" and recs[0]["teacher_bn_mode"] == "eval"
    assert kinds.count("teacher_eval") == 1 and kinds.index("teacher_eval") < kinds.index("train")
    teacher = recs[kinds.index("teacher_eval")]
    assert 0 <= teacher["top5"] and teacher["top1"] <= teacher["top5"] <= 100 and teacher["count"] == 450
    train = [r for r in recs if r["kind"] == "train"]
    for r in train:
        for field in ("loss", "hard", "soft", "weight_mean", "lr", "img_per_s", "data_wait_frac"):
            assert np.isfinite(r[field]), field
        assert 0 < r["weight_mean"] <= 1 and r["img_per_s"] > 0 and 0 <= r["data_wait_frac"] <= 1
        assert r["loss"] == pytest.approx(r["hard"] + 2.25 * r["soft"], rel=1e-5)  # WSLD: hard + alpha * soft
    # the lr logged is the one the record's last step used: base lr * schedule at that step
    cfg = load_config(run_dir / "config.yaml")
    base_lr = cfg.train.lr * cfg.data.batch_size / cfg.train.base_batch_size
    for r in train:
        assert r["lr"] == pytest.approx(base_lr * lr_factor(cfg, (r["global_step"] - 1) / 10))
    evals = [r for r in recs if r["kind"] == "eval"]
    assert [r["epoch"] for r in evals] == [1, 2]
    assert all({"top1", "top5", "ema_top1", "ema_top5"} <= set(r) for r in evals)
    assert [r["kind"] for r in recs].count("class_weights") == 2
    summary = recs[-1]
    assert summary["kind"] == "summary" and summary["last_top1"] == evals[-1]["top1"]
    assert summary["ema_last_top1"] == evals[-1]["ema_top1"]
    assert summary["best_top1"] == max(r["top1"] for r in evals)

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tb"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"train/loss", "train/soft", "train/weight_mean", "train/lr", "eval/top1", "eval/top5", "teacher_eval/top1"} <= tags
    assert [e.step for e in acc.Scalars("eval/top1")] == [10, 20]


def test_report_says_which_number_is_last_best_and_ema(cli_run):
    run_dir, out, err = cli_run
    s = load_ck(run_dir / "last.pt")
    assert "teacher top-1" in err  # teacher evaluated once at the start, logged
    assert re.search(r"last epoch \(2\), last\.pt", out)
    assert re.search(rf"best\.pt, epoch {s['best_epoch']}", out)
    assert "EMA weights" in out and "teacher cnn_teacher" in out
    assert f"{s['best_top1']:6.2f}" in out


def test_wsld_eval_reproduces_the_logged_numbers(cli_run):
    run_dir, _, _ = cli_run
    recs = records(run_dir)
    evals = {r["epoch"]: r for r in recs if r["kind"] == "eval"}
    summary = recs[-1]
    rc, out, err = run_cli(["eval", str(run_dir / "last.pt")])
    assert rc == 0, err
    assert f"top-1 {evals[2]['top1']:.2f}  top-5 {evals[2]['top5']:.2f}" in out and "(450 images)" in out
    rc, out, _ = run_cli(["eval", str(run_dir / "best.pt"), "data.val_batch_size=50"])
    assert rc == 0 and f"top-1 {evals[summary['best_epoch']]['top1']:.2f}" in out
    rc, out, _ = run_cli(["eval", str(run_dir / "last.pt"), "--ema"])
    assert rc == 0 and "EMA weights" in out and f"top-1 {evals[2]['ema_top1']:.2f}" in out
    # a checkpoint evaluated as another architecture: one clear line, exit 2
    rc, _, err = run_cli(["eval", str(run_dir / "last.pt"), "model.student=cnn_teacher"])
    assert rc == 2 and "does not fit model 'cnn_teacher'" in one_error_line(err)


def test_fresh_run_refuses_a_finished_run_directory(cli_run):
    run_dir, _, _ = cli_run
    rc, _, err = run_cli(["train", *TINY, "--out", str(run_dir)])
    assert rc == 2 and "--resume" in one_error_line(err)


def test_training_options_reach_the_step(digits_teacher, tmp_path):  # noqa: F811
    """bf16 autocast on CPU, channels_last, label smoothing, clipping, no decay on norm/bias, warmup,
    teacher in train-mode BN: one run, then check the trainer's parts and the outcome."""
    cfg = load_config(None, TINY + [
        f"model.teacher_weights={digits_teacher}", f"model.teacher_cache={tmp_path / 'cache'}",
        "train.amp=bf16", "model.channels_last=true", "distill.label_smoothing=0.1", "train.grad_clip=1.0",
        "train.wd_norm_bias=false", "train.warmup_epochs=0.5", "train.schedule=step", "train.step_size=1",
        "model.teacher_bn_mode=train", "train.epochs=1",
    ])  # fmt: skip
    trainer = build_trainer(cfg, tmp_path / "run", Runtime(torch.device("cpu")))
    summary = trainer.fit()
    assert trainer.amp_dtype == torch.bfloat16 and trainer.scaler is None  # GradScaler is for fp16 on CUDA only
    assert trainer.ctx.grad_clip == 1.0 and trainer.loss.label_smoothing == 0.1
    assert [g["weight_decay"] for g in trainer.optimizer.param_groups] == [cfg.train.weight_decay, 0.0]
    assert trainer.student.features[0].weight.is_contiguous(memory_format=torch.channels_last)
    bns = [m for m in trainer.teacher.model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert bns and all(m.training for m in bns) and not trainer.teacher.model.training
    assert np.isfinite(summary["last_top1"]) and summary["teacher_bn_mode"] == "train"
    start = records(tmp_path / "run")[0]
    assert start["teacher_bn_mode"] == "train" and start["amp"] == "torch.bfloat16" and start["channels_last"] is True
    lrs = [r["lr"] for r in records(tmp_path / "run") if r["kind"] == "train"]
    assert lrs[0] < lrs[1]  # warming up over the first half epoch


def test_teacher_runs_without_grad_and_train_bn_mode_keeps_its_statistics():
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.LazyLinear(3))
    teacher(torch.randn(2, 1, 6, 6))
    grad_modes = []
    teacher.register_forward_hook(lambda m, i, o: grad_modes.append(torch.is_grad_enabled()))
    set_teacher_bn_mode(teacher, "train")
    before = teacher[1].running_mean.clone()
    student = nn.Sequential(nn.Flatten(), nn.Linear(36, 3))
    opt = torch.optim.SGD(student.parameters(), lr=10.0)
    ctx = StepContext(student=student, teacher=teacher, loss_fn=DistillLoss("wsld", 2.0, 2.5), optimizer=opt, grad_clip=0.01)
    w0 = student[1].weight.detach().clone()
    b0 = student[1].bias.detach().clone()
    res = train_step(ctx, torch.randn(8, 1, 6, 6) * 5, torch.randint(0, 3, (8,)))
    assert int(res.status) == 0 and torch.isfinite(res.loss) and grad_modes == [False]
    assert all(p.grad is None for p in teacher.parameters())
    assert torch.equal(teacher[1].running_mean, before)  # batch statistics used, stored ones untouched
    step = torch.cat([(student[1].weight - w0).flatten(), (student[1].bias - b0).flatten()])
    assert step.norm() <= 10.0 * 0.01 * (1 + 1e-5)  # clipped gradient norm x lr


def _photo_tree(root: Path, classes=("cat", "dog", "owl"), per_class=4) -> None:
    from PIL import Image
    from sklearn.datasets import load_sample_images

    photos = load_sample_images().images
    k = 0
    for split, n in (("train", per_class), ("val", 2)):
        for c in classes:
            (root / split / c).mkdir(parents=True)
            for i in range(n):
                src = photos[k % 2]
                y, x = (37 * k) % 300, (53 * k) % 500
                Image.fromarray(np.ascontiguousarray(src[y : y + 96, x : x + 128])).save(root / split / c / f"{i}.JPEG", quality=90)
                k += 1
    buf = io.BytesIO()
    Image.fromarray(photos[0][:64, :64]).save(buf, format="JPEG")
    (root / "train" / "dog" / "truncated.JPEG").write_bytes(buf.getvalue()[:300])


def test_imagenet_layout_folder_trains_end_to_end_and_skips_a_corrupt_image(tmp_path, teacher_cache):
    """The ImageNet path (folder format, RandomResizedCrop, ImageNet normalisation) on real JPEGs."""
    _photo_tree(tmp_path / "data")
    rc, out, err = run_cli([
        "train", "data.dataset=imagenet", "data.format=folder", f"data.data_path={tmp_path / 'data'}",
        "data.image_size=32", "data.val_resize=36", "data.batch_size=13", "data.workers=0", "distill.loss=ce",
        "model.student=cnn_student", "train.epochs=1", "train.progress=false", teacher_cache, "--out", str(tmp_path / "run"),
    ])  # fmt: skip
    assert rc == 0, err
    summary = records(tmp_path / "run")[-1]
    assert summary["kind"] == "summary" and summary["teacher"] is None
    assert summary["corrupt_images"] == 1 and "student cnn_student" in out  # one step over all 13 files
    assert load_ck(tmp_path / "run" / "last.pt")["num_classes"] == 3
