"""Every numeric config value is checked up front (issue 13): NaN, infinity, out-of-range and oversized
integers stop ``wsld train`` with one line naming the key, exit code 2, before a run directory exists."""

from __future__ import annotations

import pytest
from engine_helpers import TINY, one_error_line, run_cli

from wsld.config import load_config
from wsld.errors import UserError

BAD = [  # (override, words the error line must hold)
    ("train.seed=18446744073709551616", ["train.seed", "2**63 - 1"]),  # 2**64: a traceback in torch before
    ("train.seed=-1", ["train.seed", "[0, 2**63 - 1]"]),
    ("train.momentum=-5", ["train.momentum", "[0, 1)"]),
    ("train.momentum=1", ["train.momentum", "[0, 1)"]),
    ("train.lr=nan", ["train.lr", "finite"]),
    ("train.lr=inf", ["train.lr", "finite"]),
    ("train.lr=-0.1", ["train.lr", ">= 0"]),
    ("train.weight_decay=-inf", ["train.weight_decay", "finite"]),
    ("train.warmup_epochs=nan", ["train.warmup_epochs", "finite"]),
    ("train.grad_clip=inf", ["train.grad_clip", "finite"]),
    ("train.ema_decay=nan", ["train.ema_decay", "finite"]),
    ("train.ema_decay=1", ["train.ema_decay", "[0, 1)"]),
    ("train.gamma=0", ["train.gamma", "> 0"]),
    ("train.gamma=nan", ["train.gamma", "finite"]),
    ("train.step_size=0", ["train.step_size", ">= 1"]),
    ("train.milestones=[0,5]", ["train.milestones", ">= 1"]),
    ("train.log_every=-1", ["train.log_every", ">= 0"]),
    ("train.epochs=99999999999999999999", ["train.epochs", "64-bit"]),
    ("distill.T=nan", ["distill.T", "finite"]),
    ("distill.T=inf", ["distill.T", "finite"]),
    ("distill.alpha=inf", ["distill.alpha", "finite"]),
    ("distill.params.wsld.alpha=nan", ["distill.params.wsld.alpha", "finite"]),
    ("distill.label_smoothing=nan", ["distill.label_smoothing", "finite"]),
    ("distill.label_smoothing=1", ["distill.label_smoothing", "[0, 1)"]),
    ("data.min_scale=0", ["data.min_scale", "(0, 1]"]),
    ("data.min_scale=1.5", ["data.min_scale", "(0, 1]"]),
    ("data.min_scale=nan", ["data.min_scale", "finite"]),
    ("data.long_tail_ratio=inf", ["data.long_tail_ratio", "finite"]),
    ("data.long_tail_ratio=0.5", ["data.long_tail_ratio", ">= 1"]),
    ("data.color_jitter=-0.4", ["data.color_jitter", ">= 0"]),
    ("data.val_batch_size=0", ["data.val_batch_size", ">= 1"]),
    ("data.val_resize=0", ["data.val_resize", ">= 1"]),
    ("data.std=[0.5,0,0.5]", ["data.std", "> 0"]),
    ("data.std=[nan]", ["data.std", "finite"]),
    ("data.mean=[0.5,inf,0.5]", ["data.mean", "finite"]),
    ("data.mean=[0.5,0.5]", ["data.mean", "1 or 3"]),
    ("teacher_train.lr=nan", ["teacher_train.lr", "finite"]),
    ("teacher_train.weight_decay=-1", ["teacher_train.weight_decay", ">= 0"]),
    ("distill.params.weighting=sometimes", ["distill.params.weighting", "on, off"]),
]


@pytest.mark.parametrize("override, words", BAD, ids=[b[0] for b in BAD])
def test_train_refuses_bad_number_before_anything_runs(tmp_path, teacher_cache, override, words):
    out = tmp_path / "run"
    rc, _, err = run_cli(["train", *TINY, teacher_cache, override, "--out", str(out)])
    assert rc == 2, err
    line = one_error_line(err)
    for w in words:
        assert w in line, (w, line)
    assert not out.exists()
    assert not (tmp_path / "teacher_cache").exists()


def test_boundary_values_are_accepted():
    cfg = load_config(None, ["train.seed=9223372036854775807", "train.momentum=0", "data.min_scale=1", "train.gamma=2",
                             "data.std=[0.1,0.2,0.3]", "train.ema_decay=0", "distill.label_smoothing=0"])  # fmt: skip
    assert (cfg.train.seed, cfg.train.momentum, cfg.data.min_scale) == (2**63 - 1, 0.0, 1.0)


def test_yaml_nan_and_infinity_are_refused_through_load_config(tmp_path):
    for text, key in [("train:\n  lr: .nan\n", "train.lr"), ("distill:\n  T: .inf\n", "distill.T"),
                      ("data:\n  std: [0.2, -.inf, 0.2]\n", "data.std")]:  # fmt: skip
        f = tmp_path / "c.yaml"
        f.write_text(text)
        with pytest.raises(UserError, match=f"'{key}'"):
            load_config(f)


def test_kd_alpha_bound_applies_to_kd_only():
    with pytest.raises(UserError, match="distill.alpha.*kd"):
        load_config(None, ["distill.loss=kd", "distill.alpha=1.5"])
    with pytest.raises(UserError, match="distill.params.kd.alpha.*<= 1"):
        load_config(None, ["distill.loss=kd", "distill.params.kd.alpha=1.5"])
    assert load_config(None, ["distill.loss=dkd", "distill.alpha=1.5"]).distill.params["dkd"]["alpha"] == 1.5
