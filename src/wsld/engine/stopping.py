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
    """Records the first SIGTERM/SIGINT; the loop asks ``requested()`` at its stopping points. A second
    signal of the same kind acts as if nothing was installed (Ctrl-C twice kills at once).

    Requests nest (``wsld train`` around a run, a run around the teacher run it trains first): only
    the outermost installs the handlers; a signal is recorded in every open request, and a request
    opened after a signal starts with it, so a stop asked for in one phase (the teacher's last
    evaluation, data loading) is honoured by the next stopping point, whichever phase it is in.
    """

    _open: list["StopRequest"] = []  # the requests now open, outermost first

    def __init__(self) -> None:
        self.signum: Optional[int] = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "StopRequest":
        if StopRequest._open:
            self.signum = StopRequest._open[-1].signum
        elif threading.current_thread() is threading.main_thread():
            for s in HANDLED:
                self._previous[s] = signal.signal(s, self._handle)
        StopRequest._open.append(self)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self in StopRequest._open:
            StopRequest._open.remove(self)
        for s, h in self._previous.items():
            signal.signal(s, h)
        self._previous.clear()

    def _handle(self, signum: int, frame: Any) -> None:
        for request in StopRequest._open:
            request.signum = request.signum or signum
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
