"""One optimisation step of the student: ``train_step``, the only place a step is written (the benchmarks call it too).

No host sync in a steady-state step: whether a step's loss and gradients were finite is decided on
the device (``UpdateGuard``) and read by the loop once per log window (``engine.health``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Callable, NamedTuple, Optional, Union

import torch
import torch.distributed as dist
from torch import Tensor, nn

from wsld.data.batch import Batch
from wsld.runtime import autocast
from wsld.teachers.base import TeacherSource
from wsld.teachers.live import LiveTeacher

# a step's status (a 0-d int32 tensor on the device): why it was not applied, or APPLIED
APPLIED, LOSS_NOT_FINITE, GRADS_NOT_FINITE, STAND_IN = 0, 1, 2, 3
# test hook (docs/engine.md): WSLD_TEST_DEVICE_VERDICT=1 takes the CUDA path's device-side verdict on a CPU
DEVICE_VERDICT_ENV = "WSLD_TEST_DEVICE_VERDICT"


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


class UpdateGuard:
    """Undoes, on the device, an update that should not have happened: the student's parameters,
    buffers (BatchNorm statistics) and optimiser state are copied before the step and put
    back with ``torch.where(skip, copy, new)`` after it, so the host never waits for the verdict.

    Exact: a kept step is the plain step bit for bit, a skipped one leaves every tensor as it was.
    Used on CUDA. Until the optimiser's state exists (its first step in this process, before a
    resume's state is loaded) the state it creates could not be undone, so that step is decided on
    the host (one read); so is every step where some state lives on another device than the
    parameters, and every step on a CPU, where reading a value costs no sync and copying the
    weights would cost time (the CPU path only copies the buffers, to undo BatchNorm's update).
    """

    def __init__(self, optimizer: torch.optim.Optimizer, model: nn.Module):
        self.optimizer = optimizer
        self.model = model
        self.warm = len(optimizer.state) > 0  # a loaded (resumed) state: device decisions from the start
        self.on_cpu_too = os.environ.get(DEVICE_VERDICT_ENV) == "1"  # test hook: the CUDA path on a CPU
        self._saved: list[Tensor] = []
        self._copies: list[Tensor] = []

    def tensors(self) -> list[Tensor]:
        """Everything an optimiser step (and the forward's BatchNorm) may change."""
        out: list[Tensor] = []
        seen: set[int] = set()
        for g in self.optimizer.param_groups:
            for p in g["params"]:
                if id(p) in seen:
                    continue
                seen.add(id(p))
                out.append(p.data)
                out.extend(v for v in self.optimizer.state.get(p, {}).values() if isinstance(v, Tensor))
        out.extend(self.model.buffers())
        return out

    def on_device(self, device: torch.device) -> bool:
        """Whether this step's verdict stays on ``device``: CUDA, the state exists and lives there."""
        if not self.warm or (device.type != "cuda" and not self.on_cpu_too):
            return False
        return all(t.device == device for t in self.tensors())

    def save(self, everything: bool) -> None:
        """Copies what a step may change (``everything``), or only the buffers."""
        ts = self.tensors() if everything else list(self.model.buffers())
        if len(self._copies) != len(ts) or any(c.shape != t.shape or c.dtype != t.dtype for c, t in zip(self._copies, ts)):
            self._copies = [torch.empty_like(t) for t in ts]
        if ts:
            torch._foreach_copy_(self._copies, ts)
        self._saved = ts

    def undo_where(self, skip: Tensor) -> None:
        for t, c in zip(self._saved, self._copies):
            torch.where(skip, c, t, out=t)


@dataclass
class StepContext:
    """Everything ``train_step`` needs besides the batch.

    ``teacher`` is a ``TeacherSource`` (a bare ``nn.Module`` is wrapped as a ``LiveTeacher`` that
    keeps the module's current BatchNorm mode), or None for a loss without a teacher.
    ``check_finite``: a step whose loss or gradients are not finite (on any rank) is not applied
    (``train_step``'s status says so); off, every step is applied (benchmarks measure its cost).
    ``params_module`` is the module whose parameters the optimiser holds (the student, unwrapped),
    when ``student`` is a wrapper (DDP, torch.compile).
    """

    student: nn.Module
    teacher: Optional[Union[TeacherSource, nn.Module]]
    loss_fn: Callable[[Tensor, Optional[Tensor], Tensor], tuple[Tensor, dict[str, Tensor]]]
    optimizer: torch.optim.Optimizer
    scaler: Optional[torch.amp.GradScaler] = None
    amp_dtype: Optional[torch.dtype] = None
    grad_clip: float = 0.0
    check_finite: bool = True
    params_module: Optional[nn.Module] = None
    guard: Optional[UpdateGuard] = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if isinstance(self.teacher, nn.Module):
            self.teacher = LiveTeacher(self.teacher, bn_mode=None, amp_dtype=self.amp_dtype)
        if self.check_finite and self.guard is None:
            self.guard = UpdateGuard(self.optimizer, self.params_module or self.student)


class StepResult(NamedTuple):
    """What a step leaves on the device: the loss, the loss's parts and the step's status
    (0-d int32: ``APPLIED``, ``LOSS_NOT_FINITE``, ``GRADS_NOT_FINITE`` or ``STAND_IN``; None when
    the context does not check). Nothing here has been read by the host."""

    loss: Tensor
    parts: dict[str, Tensor]
    status: Optional[Tensor]
    skipped_on_host: Optional[bool]  # the verdict where the host had to take it (the first step), else None


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _grads_not_finite(params: list[Tensor], device: torch.device) -> Tensor:
    """1.0 when a gradient holds NaN/Inf (the kernel GradScaler uses; a scale of 1 leaves them as they are)."""
    found = torch.zeros(1, device=device)
    one = torch.ones(1, device=device)
    by_dtype: dict[torch.dtype, list[Tensor]] = {}
    for p in params:
        if p.grad is not None:
            by_dtype.setdefault(p.grad.dtype, []).append(p.grad)
    for grads in by_dtype.values():
        torch._amp_foreach_non_finite_check_and_unscale_(grads, found, one)
    return found[0] > 0


def train_step(ctx: StepContext, images: Tensor, targets: Tensor, batch: Optional[Batch] = None,
               stand_in: bool = False) -> StepResult:  # fmt: skip
    """One optimisation step of the student, without a host sync once the optimiser's state exists.

    ``images`` are normalised and on the device; ``batch`` is the loader's batch they came from
    (a stored-soft-label teacher reads its records from it). ``stand_in``: this rank's own batch
    was empty (every image corrupt) and ``images`` stand in for it under DDP, so the others need
    not wait for a verdict: its gradients are poisoned with NaN, DDP's all-reduce spreads them,
    and every rank skips the step. Non-finite losses are spread the same way (loss x NaN), so all
    ranks take the same decision with no collective of their own."""
    guard = ctx.guard
    dev = images.device
    guarded = ctx.check_finite and ctx.scaler is None and guard is not None
    on_device = guarded and guard.on_device(dev)
    if guarded:
        guard.save(everything=on_device)  # before the forward: it moves BatchNorm's running statistics
    run_teacher = ctx.teacher is not None and not stand_in  # a stand-in has no teacher records: its step is discarded anyway
    teacher_logits = ctx.teacher.logits(images, batch) if run_teacher else None
    with autocast(dev, ctx.amp_dtype):
        student_logits = ctx.student(images)
    if stand_in and ctx.teacher is not None:
        teacher_logits = torch.zeros_like(student_logits)
    loss, parts = ctx.loss_fn(student_logits, teacher_logits, targets)
    ctx.optimizer.zero_grad(set_to_none=True)
    if not ctx.check_finite:
        _backward_and_step(ctx, loss)
        return StepResult(loss.detach(), parts, None, None)
    assert guard is not None
    loss_bad = ~torch.isfinite(loss.detach())
    if stand_in:
        loss_bad = torch.ones_like(loss_bad)
    # x1 (exact: the same gradients bit for bit) or x NaN (every gradient NaN, on every rank after DDP)
    poisoned = loss * torch.where(loss_bad, torch.full_like(loss, float("nan")), torch.ones_like(loss))
    params = [p for g in ctx.optimizer.param_groups for p in g["params"]]
    if ctx.scaler is not None:
        # fp16: GradScaler skips steps with inf gradients itself (overflow is normal there, not a
        # divergence, and its step reads that verdict on the host): ours is the loss's, agreed by one
        # small all-reduce
        bad = loss_bad.to(torch.int32)
        if _distributed():
            dist.all_reduce(bad, op=dist.ReduceOp.MAX)
        ctx.scaler.scale(poisoned).backward()
        if ctx.grad_clip > 0:
            ctx.scaler.unscale_(ctx.optimizer)
            nn.utils.clip_grad_norm_(params, ctx.grad_clip)
        ctx.scaler.step(ctx.optimizer)  # skipped by the scaler when the (poisoned) gradients are not finite
        ctx.scaler.update()
        status = torch.where(bad > 0, LOSS_NOT_FINITE, APPLIED).to(torch.int32)
        return StepResult(loss.detach(), parts, _stand_in(status, stand_in), None)
    poisoned.backward()
    norm = nn.utils.clip_grad_norm_(params, ctx.grad_clip) if ctx.grad_clip > 0 else None
    if dev.type == "cuda" or on_device or _distributed():
        # the gradients' verdict: the same on every rank once DDP has averaged the (poisoned) gradients
        bad = ~torch.isfinite(norm) if norm is not None else _grads_not_finite(params, dev)
    else:  # one CPU process: the loss's, as it always was (no pass over the gradients)
        bad = loss_bad
    status = torch.where(bad, torch.where(loss_bad, LOSS_NOT_FINITE, GRADS_NOT_FINITE), APPLIED).to(torch.int32)
    status = _stand_in(status, stand_in)
    if on_device:
        ctx.optimizer.step()
        guard.undo_where(bad)
        return StepResult(loss.detach(), parts, status, None)
    skipped = bool(bad)  # decided on the host: a CPU, or the optimiser's state does not exist yet
    if skipped:
        guard.undo_where(bad)  # the forward's BatchNorm statistics
    else:
        ctx.optimizer.step()
        guard.warm = True
    return StepResult(loss.detach(), parts, status, skipped)


def stand_in_inputs(info: Any, device: torch.device, channels_last: bool) -> tuple[Tensor, Tensor]:
    """Images and targets that stand in for a rank's empty batch under DDP (``info``: the data's
    ``DataInfo``); ``train_step(..., stand_in=True)`` discards the step on every rank."""
    x = torch.zeros((2, info.in_channels, info.image_size, info.image_size), device=device)
    x = x.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    return x, torch.zeros(2, dtype=torch.int64, device=device)


def _stand_in(status: Tensor, stand_in: bool) -> Tensor:
    return torch.full_like(status, STAND_IN) if stand_in else status


def _backward_and_step(ctx: StepContext, loss: Tensor) -> None:
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


@torch.no_grad()
def update_ema(ema: nn.Module, model: nn.Module, decay: float, result: StepResult) -> None:
    """``AveragedModel.update_parameters`` with ``get_ema_multi_avg_fn(decay)`` and ``use_buffers=True``,
    the same arithmetic, without its host syncs, and left undone where the step was not applied
    (``result.status`` on the device). ``ema`` is the AveragedModel; its ``n_averaged`` (a CPU tensor)
    counts every call: the loop takes the skipped steps back off once it has read them."""
    if result.skipped_on_host:
        ema.n_averaged += 1  # counted like the others: the loop takes every step not applied back off
        return
    ema_t = [*ema.module.parameters(), *ema.module.buffers()]
    cur_t = [t.detach() for t in (*model.parameters(), *model.buffers())]
    known = result.status is None or result.skipped_on_host is False  # applied, as the host knows
    skip = None if known else result.status != APPLIED
    if int(ema.n_averaged) == 0:  # the first update copies (a CPU tensor: no device sync)
        for e, c in zip(ema_t, cur_t):
            e.detach().copy_(c if skip is None else torch.where(skip, e, c))
    else:
        copies = [e.detach().clone() for e in ema_t] if skip is not None else []
        floats = [(e.detach(), c) for e, c in zip(ema_t, cur_t) if e.is_floating_point()]
        by_dtype: dict[torch.dtype, tuple[list[Tensor], list[Tensor]]] = {}
        for e, c in floats:
            es, cs = by_dtype.setdefault(e.dtype, ([], []))
            es.append(e)
            cs.append(c)
        for es, cs in by_dtype.values():
            torch._foreach_lerp_(es, cs, 1 - decay)
        for e, c in zip(ema_t, cur_t):
            if not e.is_floating_point():
                e.detach().copy_(e * decay + c * (1 - decay))
        if skip is not None:
            for e, old in zip(ema_t, copies):
                torch.where(skip, old, e.detach(), out=e.detach())
    ema.n_averaged += 1
