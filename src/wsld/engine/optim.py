"""The optimiser and the learning-rate schedule (a pure function of the fractional epoch, so a resumed step has the same rate)."""

from __future__ import annotations

import math

import torch
from torch import nn


def build_optimizer(model: nn.Module, cfg, lr: float) -> torch.optim.Optimizer:
    t = cfg.train
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if (p.ndim <= 1 and not t.wd_norm_bias) else decay).append(p)
    groups = [{"params": decay, "weight_decay": t.weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    if t.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=t.momentum, nesterov=t.nesterov and t.momentum > 0)
    # capturable on CUDA: its step count lives on the device, so the non-finite guard needs no host read
    on_cuda = any(p.is_cuda for g in groups for p in g["params"])
    return torch.optim.AdamW(groups, lr=lr, capturable=on_cuda)


def lr_factor(cfg, epoch_float: float) -> float:
    """Multiplier of the base lr at a (fractional) epoch: linear warmup, then the schedule.

    step/multistep change at whole epochs, as the reference did; cosine decays per step.
    """
    t = cfg.train
    if t.warmup_epochs > 0 and epoch_float < t.warmup_epochs:
        return (epoch_float + 1e-12) / t.warmup_epochs
    if t.schedule == "cosine":
        span = max(1e-12, t.epochs - t.warmup_epochs)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (epoch_float - t.warmup_epochs) / span)))
    if t.schedule == "step":
        return t.gamma ** (int(epoch_float) // t.step_size)
    if t.schedule == "multistep":
        return t.gamma ** sum(1 for m in t.milestones if int(epoch_float) >= m)
    return 1.0


def effective_lr(cfg) -> float:
    """``train.lr`` is for a global batch of ``train.base_batch_size``; it scales linearly."""
    return cfg.train.lr * cfg.data.batch_size / cfg.train.base_batch_size
