"""The one place that decides where a run's teacher logits come from: stored soft labels or a live model (trained first if need be)."""

from __future__ import annotations

from typing import Callable, Optional

import torch

from wsld.config import Config
from wsld.data import DataInfo
from wsld.model_input import check_takes_images
from wsld.models import build_model
from wsld.runtime import Runtime, amp_dtype_for, compile_module, use_channels_last
from wsld.teachers.base import TeacherSource
from wsld.teachers.live import LiveTeacher
from wsld.teachers.training import ensure_teacher


def open_teacher_source(cfg: Config, rt: Runtime, info: DataInfo, log: Callable[[str], None]) -> Optional[TeacherSource]:
    """``distill.soft_labels`` set: the stored outputs, replayed per crop (no network runs).
    Otherwise the live ``model.teacher`` with ``model.teacher_weights`` (trained with CE and cached
    when they are null), on the run's device, in ``model.teacher_bn_mode``."""
    if cfg.distill.soft_labels:
        from wsld.teachers.stored import open_stored_teacher

        return open_stored_teacher(cfg, info, log)
    weights = ensure_teacher(cfg, rt, log, info.identity)
    model = build_model(
        cfg.model.teacher, info.num_classes, in_channels=info.in_channels, weights=weights,
        replace_head_if_needed=False, role="teacher",
    )  # fmt: skip
    check_takes_images(model, cfg.model.teacher, info.in_channels, info.image_size, info.num_classes)
    mf = torch.channels_last if use_channels_last(cfg.model.channels_last, rt.device) else torch.contiguous_format
    model.to(rt.device, memory_format=mf)
    forward = compile_module(model) if cfg.model.compile else model
    return LiveTeacher(
        model, name=cfg.model.teacher, weights=weights, bn_mode=cfg.model.teacher_bn_mode,
        amp_dtype=amp_dtype_for(cfg.train.amp, rt.device), forward=forward,
    )  # fmt: skip
