"""One optimisation step of the student: ``train_step``, the only place a step is written (the benchmarks call it too)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Union

import torch
import torch.distributed as dist
from torch import Tensor, nn

from wsld.data.batch import Batch
from wsld.runtime import autocast
from wsld.teachers.base import TeacherSource
from wsld.teachers.live import LiveTeacher


class BatchNormalizer:
    """uint8 NCHW batch -> normalised float on the device (loaders move uint8: 4x less traffic)."""

    def __init__(self, mean: list[float], std: list[float], device: torch.device, channels_last: bool = False):
        self.mean = torch.tensor(mean, device=device).view(1, -1, 1, 1) * 255.0
        self.inv_std = 1.0 / (torch.tensor(std, device=device).view(1, -1, 1, 1) * 255.0)
        self.device = device
        self.channels_last = channels_last

    def __call__(self, images: Tensor) -> Tensor:
        x = images.to(self.device, non_blocking=True)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return (x.float() - self.mean) * self.inv_std

    def prepare(self, batch: Batch) -> Batch:
        """The batch with its images normalised on the device (``GpuDecoder.prepare`` is the same
        step for batches that arrive encoded)."""
        if len(batch) == 0:
            return batch
        return Batch(self(batch.images), batch.targets, batch.corrupt, batch.teacher_records)


@dataclass
class StepContext:
    """Everything ``train_step`` needs besides the batch.

    ``teacher`` is a ``TeacherSource`` (a bare ``nn.Module`` is wrapped as a ``LiveTeacher`` that
    keeps the module's current BatchNorm mode), or None for a loss without a teacher.
    """

    student: nn.Module
    teacher: Optional[Union[TeacherSource, nn.Module]]
    loss_fn: Callable[[Tensor, Optional[Tensor], Tensor], tuple[Tensor, dict[str, Tensor]]]
    optimizer: torch.optim.Optimizer
    scaler: Optional[torch.amp.GradScaler] = None
    amp_dtype: Optional[torch.dtype] = None
    grad_clip: float = 0.0
    check_finite: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.teacher, nn.Module):
            self.teacher = LiveTeacher(self.teacher, bn_mode=None, amp_dtype=self.amp_dtype)


def all_finite(loss: Tensor) -> bool:
    """One host sync per step; under DDP every rank takes the same decision."""
    ok = torch.isfinite(loss.detach()).to(torch.int32)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(ok, op=dist.ReduceOp.MIN)
    return bool(ok.item())


def train_step(ctx: StepContext, images: Tensor, targets: Tensor, batch: Optional[Batch] = None) -> tuple[Optional[Tensor], dict[str, Tensor]]:
    """One optimisation step of the student. Returns (loss, parts); loss is None if it was not
    finite and the step was skipped (the caller decides what a non-finite loss means).

    ``images`` are normalised and on the device; ``batch`` is the loader's batch they came from
    (a stored-soft-label teacher reads its records from it)."""
    teacher_logits = ctx.teacher.logits(images, batch) if ctx.teacher is not None else None
    with autocast(images.device, ctx.amp_dtype):
        student_logits = ctx.student(images)
    loss, parts = ctx.loss_fn(student_logits, teacher_logits, targets)
    if ctx.check_finite and not all_finite(loss):
        ctx.optimizer.zero_grad(set_to_none=True)
        return None, parts
    ctx.optimizer.zero_grad(set_to_none=True)
    if ctx.scaler is not None:
        ctx.scaler.scale(loss).backward()
        if ctx.grad_clip > 0:
            ctx.scaler.unscale_(ctx.optimizer)
            nn.utils.clip_grad_norm_(ctx.student.parameters(), ctx.grad_clip)
        ctx.scaler.step(ctx.optimizer)
        ctx.scaler.update()
    else:
        loss.backward()
        if ctx.grad_clip > 0:
            nn.utils.clip_grad_norm_(ctx.student.parameters(), ctx.grad_clip)
        ctx.optimizer.step()
    return loss.detach(), parts
