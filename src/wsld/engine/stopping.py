"""Graceful stops: SIGTERM/SIGINT (preemption, Ctrl-C) finish the current step, write a checkpoint and exit 143/130."""

from __future__ import annotations

import signal
import threading
from typing import Any, Optional

import torch
import torch.distributed as dist

from wsld.errors import UserError

HANDLED = (signal.SIGTERM, signal.SIGINT)


class TrainingStopped(UserError):
    """Stopped by a signal after a checkpoint was written; exit status 128 + the signal number."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + signum


class StopRequest:
    """Records the first SIGTERM/SIGINT; the loop asks ``requested()`` after each step. A second
    signal of the same kind acts as if nothing was installed (Ctrl-C twice kills at once)."""

    def __init__(self) -> None:
        self.signum: Optional[int] = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():
            for s in HANDLED:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for s, h in self._previous.items():
            signal.signal(s, h)
        self._previous.clear()

    def _handle(self, signum: int, frame: Any) -> None:
        self.signum = signum
        signal.signal(signum, self._previous.get(signum, signal.SIG_DFL))

    def requested(self, distributed: bool, device: torch.device) -> Optional[int]:
        """The signal number if this process or (under DDP) any rank got one; every rank agrees."""
        if not distributed:
            return self.signum
        t = torch.tensor([self.signum or 0], device=device, dtype=torch.int32)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return int(t.item()) or None


def ignore_stop_signals_in_worker(worker_id: int) -> None:
    """DataLoader worker init: the main process decides how to stop; a worker killed by the
    terminal's Ctrl-C or a scheduler's SIGTERM would break the batch the step is waiting for."""
    for s in HANDLED:
        signal.signal(s, signal.SIG_IGN)


def signal_name(signum: int) -> str:
    return signal.Signals(signum).name
