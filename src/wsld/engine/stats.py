"""Running sums of a training epoch (the loss, every part the loss returns, per-class WSLD weights), checkpointed mid-epoch."""

from __future__ import annotations

import time
from typing import Any, Optional

import torch
import torch.distributed as dist
from torch import Tensor

from wsld.runtime import Runtime


class EpochStats:
    """Running sums of one epoch: the loss and every scalar part the loss returns, since the last
    metrics line, and the per-class mean of a per-sample ``sample_weight`` part (WSLD's weights).
    Saved in mid-epoch checkpoints, so a resumed run logs the same numbers."""

    OLD_NAMES = ["loss", "hard", "soft", "weight_mean"]  # the fixed order of checkpoints before named parts

    def __init__(self, num_classes: int, device: torch.device):
        self.device = device
        self.names: list[str] = []
        self.sums = torch.zeros(0, device=device, dtype=torch.float64)
        self.n = 0
        self.class_w_sum = torch.zeros(num_classes, device=device, dtype=torch.float64)
        self.class_n = torch.zeros(num_classes, device=device, dtype=torch.float64)
        self.lr = 0.0
        self.reset_window()

    def reset_window(self) -> None:
        self.sums.zero_()
        self.n = 0
        self.imgs = 0
        self.wait = 0.0
        self.t0 = time.perf_counter()
        self._events: list[list] = []  # CUDA: [start, end] events of each step of the window

    def step_started(self) -> None:
        """Marks a step's start on the device's timeline (CUDA only; no sync)."""
        if self.device.type == "cuda":
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            self._events.append([e, None])

    def step_ended(self) -> None:
        if self.device.type == "cuda" and self._events:
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            self._events[-1][1] = e

    def device_fields(self) -> dict[str, float]:
        """``gpu_busy_frac`` for the window's metrics line, where it is known (CUDA)."""
        busy = self.gpu_busy()
        return {"gpu_busy_frac": busy} if busy is not None else {}

    def gpu_busy(self) -> Optional[float]:
        """Share of the device's timeline, from the window's first step start to its last step end,
        spent inside steps (CUDA events: what the device did, not when the host asked). None on a
        CPU, or before the events have completed (the window's read has synced them)."""
        pairs = [(s, e) for s, e in self._events if e is not None]
        if len(pairs) < 2 or not pairs[-1][1].query():
            return None
        span = pairs[0][0].elapsed_time(pairs[-1][1])
        return min(1.0, sum(s.elapsed_time(e) for s, e in pairs) / span) if span > 0 else None

    def add(self, loss: Tensor, parts: dict[str, Tensor], y: Tensor, applied: Optional[Tensor] = None) -> None:
        """Adds a step's values; ``applied`` (a 0-d bool on the device) masks out a step that was not
        applied without the host reading it: ``n`` counts it until ``drop`` takes it back."""
        scalars = {"loss": loss, **{k: v for k, v in parts.items() if v.ndim == 0}}
        if not self.names:
            self.names = list(scalars)
            self.sums = torch.zeros(len(self.names), device=self.device, dtype=torch.float64)
        values = torch.stack([scalars[k].double() for k in self.names])
        self.sums += values if applied is None else torch.where(applied, values, 0.0)
        self.n += 1
        sw = parts.get("sample_weight")
        if sw is not None and sw.ndim == 1:
            w, ones = sw.double(), torch.ones_like(sw, dtype=torch.float64)
            if applied is not None:
                w, ones = torch.where(applied, w, 0.0), ones * applied
            self.class_w_sum.index_add_(0, y, w)
            self.class_n.index_add_(0, y, ones)
        self.step_ended()

    def drop(self, steps: int) -> None:
        """Take back ``steps`` steps that ``add`` counted but were not applied (known once read)."""
        self.n -= steps

    def means(self, rt: Runtime) -> dict[str, float]:
        """Mean of each part over the window (and over the ranks)."""
        sums = self.sums
        if rt.distributed:
            sums = sums.clone()
            dist.all_reduce(sums)
            sums /= rt.world_size
        return dict(zip(self.names, (sums / max(1, self.n)).tolist()))

    def class_weights(self, rt: Runtime) -> Optional[list[float]]:
        """Mean WSLD weight per class over the epoch (all ranks), None for losses without weights."""
        w, n = self.class_w_sum, self.class_n
        if rt.distributed:
            w, n = w.clone(), n.clone()
            dist.all_reduce(w)
            dist.all_reduce(n)
        if n.sum() <= 0:
            return None
        return (w / n.clamp_min(1)).cpu().tolist()

    def state(self) -> dict[str, Any]:
        return {"names": list(self.names), "sums": self.sums.cpu(), "n": self.n, "class_w_sum": self.class_w_sum.cpu(), "class_n": self.class_n.cpu()}

    def load(self, st: dict[str, Any]) -> None:
        self.names = list(st.get("names") or self.OLD_NAMES)
        self.sums = st["sums"].to(self.device, torch.float64).clone()
        self.n = int(st["n"])
        self.class_w_sum.copy_(st["class_w_sum"])
        self.class_n.copy_(st["class_n"])
