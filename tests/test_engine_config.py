"""Shipped configs, the learning-rate schedule and the optimiser's parameter groups."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import nn

from wsld.config import load_config
from wsld.engine.optim import build_optimizer, effective_lr, lr_factor

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
EXPECTED = [
    "digits_ce", "digits_kd", "digits_wsld", "fashion_mnist_ce", "fashion_mnist_kd", "fashion_mnist_wsld",
    "imagenet_resnet34_resnet18_ce", "imagenet_resnet34_resnet18_kd", "imagenet_resnet34_resnet18_wsld",
    "imagenet_resnet34_resnet18_dkd", "imagenet_resnet34_resnet18_dist", "imagenet_resnet50_mobilenetv1_wsld",
]  # fmt: skip


def _load(name: str, *overrides: str):
    extra = ["data.data_path=/data/imagenet"] if name.startswith("imagenet") else []
    return load_config(CONFIGS / f"{name}.yaml", extra + list(overrides))


@pytest.mark.parametrize("name", EXPECTED)
def test_every_shipped_config_loads_and_states_the_lr_rule(name):
    cfg = _load(name)
    text = (CONFIGS / f"{name}.yaml").read_text()
    assert "scales" in text and "linearly" in text and "base_batch_size" in text
    assert cfg.distill.loss == name.rsplit("_", 1)[-1]
    if cfg.distill.loss == "kd" and "chosen by `wsld compare" not in text:  # the published recipe, unless compared
        assert (cfg.distill.T, cfg.distill.params["kd"]["alpha"]) == (4.0, 0.9)


def test_fashion_mnist_wsld_config_is_the_built_in_default():
    assert load_config(CONFIGS / "fashion_mnist_wsld.yaml") == load_config(None)


def test_imagenet_wsld_config_is_the_reference_recipe():
    cfg = _load("imagenet_resnet34_resnet18_wsld")
    assert (cfg.data.dataset, cfg.data.format, cfg.data.batch_size) == ("imagenet", "folder", 256)
    assert (cfg.model.teacher, cfg.model.teacher_weights, cfg.model.student) == ("resnet34", "IMAGENET1K_V1", "resnet18")
    assert cfg.model.teacher_bn_mode in ("eval", "train")
    t = cfg.train
    assert (t.optimizer, t.momentum, t.nesterov, t.lr, t.base_batch_size) == ("sgd", 0.9, True, 0.1, 256)
    assert (t.weight_decay, t.wd_norm_bias, t.schedule, t.step_size, t.gamma, t.epochs) == (1e-4, True, "step", 30, 0.1, 100)
    assert (cfg.distill.T, cfg.distill.params["wsld"]["alpha"], t.amp, t.warmup_epochs, cfg.distill.label_smoothing) == (2.0, 2.5, "auto", 0.0, 0.0)
    assert effective_lr(cfg) == pytest.approx(0.1)
    assert effective_lr(_load("imagenet_resnet34_resnet18_wsld", "data.batch_size=1024")) == pytest.approx(0.4)
    # the lr falls x0.1 at epochs 30, 60, 90 and nowhere else
    assert [lr_factor(cfg, e) for e in (0, 29.99, 30, 59.9, 60, 90, 99.99)] == pytest.approx([1, 1, 0.1, 0.1, 0.01, 0.001, 0.001])
    mbv1 = _load("imagenet_resnet50_mobilenetv1_wsld")
    assert (mbv1.model.teacher, mbv1.model.student) == ("resnet50", "mobilenet_v1")


@pytest.mark.parametrize("name", ["imagenet_resnet34_resnet18_dkd", "imagenet_resnet34_resnet18_dist"])
def test_imagenet_dkd_and_dist_configs_are_the_published_recipes_on_the_wsld_training_recipe(name):
    """Same data, models and training as the WSLD config; only distill: differs (the papers' published values)."""
    cfg, ref = _load(name), _load("imagenet_resnet34_resnet18_wsld")
    assert (cfg.data, cfg.model, cfg.train, cfg.checkpoint) == (ref.data, ref.model, ref.train, ref.checkpoint)
    d = cfg.distill
    if d.loss == "dkd":
        assert (d.T, d.params) == (1.0, {"dkd": {"alpha": 0.5, "beta": 0.5, "ce_weight": 1.0, "warmup_epochs": 1.0}})
    else:
        assert (d.T, d.params) == (1.0, {"dist": {"beta": 1.0, "gamma": 1.0, "weight": 2.0}})


def test_digits_configs_do_not_flip():
    for name in ("digits_ce", "digits_kd", "digits_wsld"):
        assert _load(name).data.hflip is False


def _cfg(*overrides: str):
    return load_config(None, ["train.epochs=10", *overrides])


def test_lr_factor_warmup_then_cosine():
    cfg = _cfg("train.schedule=cosine", "train.warmup_epochs=2")
    assert lr_factor(cfg, 0.0) == pytest.approx(0.0, abs=1e-9)
    assert lr_factor(cfg, 1.0) == pytest.approx(0.5)
    assert lr_factor(cfg, 2.0) == pytest.approx(1.0)
    assert lr_factor(cfg, 6.0) == pytest.approx(0.5)  # half way through the 8 cosine epochs
    assert lr_factor(cfg, 10.0) == pytest.approx(0.0, abs=1e-12)
    steps = [lr_factor(cfg, 2 + i / 10) for i in range(80)]
    assert all(a >= b for a, b in zip(steps, steps[1:]))  # monotone after warmup


def test_lr_factor_step_multistep_constant():
    step = _cfg("train.schedule=step", "train.step_size=3", "train.gamma=0.5")
    assert [lr_factor(step, e) for e in (0, 2.9, 3, 6, 9.5)] == pytest.approx([1, 1, 0.5, 0.25, 0.125])
    multi = _cfg("train.schedule=multistep", "train.milestones=[2,7]", "train.gamma=0.1")
    assert [lr_factor(multi, e) for e in (1.9, 2, 6.9, 7, 9)] == pytest.approx([1, 0.1, 0.1, 0.01, 0.01])
    warm = _cfg("train.schedule=step", "train.step_size=5", "train.warmup_epochs=1")
    assert lr_factor(warm, 0.25) == pytest.approx(0.25)
    assert lr_factor(warm, 1.0) == pytest.approx(1.0)
    assert lr_factor(warm, 5.0) == pytest.approx(0.1)
    assert lr_factor(_cfg("train.schedule=constant"), 7.3) == 1.0


def test_weight_decay_on_or_off_for_norm_and_bias():
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4, 2))
    n_matrix = 2  # conv weight, linear weight
    all_decay = build_optimizer(model, _cfg("train.wd_norm_bias=true", "train.weight_decay=0.01"), 0.1)
    assert [g["weight_decay"] for g in all_decay.param_groups] == [0.01]
    split = build_optimizer(model, _cfg("train.wd_norm_bias=false", "train.weight_decay=0.01"), 0.1)
    decay, no_decay = split.param_groups
    assert decay["weight_decay"] == 0.01 and len(decay["params"]) == n_matrix
    assert no_decay["weight_decay"] == 0.0 and all(p.ndim == 1 for p in no_decay["params"])
    assert split.defaults["nesterov"] is True and math.isclose(split.defaults["momentum"], 0.9)
    assert isinstance(build_optimizer(model, _cfg("train.optimizer=adamw"), 0.1), torch.optim.AdamW)


def test_amp_off_survives_yaml_booleans(tmp_path):
    """YAML reads `off` as false: `train.amp=off` on the command line or in a file still means off."""
    assert load_config(None, ["train.amp=off"]).train.amp == "off"
    f = tmp_path / "c.yaml"
    f.write_text("train:\n  amp: off\n")
    assert load_config(f).train.amp == "off"


@pytest.mark.parametrize("name", sorted(p.stem for p in CONFIGS.glob("*.yaml")))
def test_every_shipped_config_runs_with_any_loss(name):
    """distill.loss=<any> on any shipped config loads: no loss trips on another loss's parameters."""
    from wsld.losses.registry import LOSSES

    for loss in LOSSES:
        assert load_config(CONFIGS / f"{name}.yaml", [f"distill.loss={loss}", "data.data_path=/data"]).distill.loss == loss
