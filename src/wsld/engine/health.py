"""Reading the steps' device-side verdicts once per window: which steps were not applied and why, and (DDP) stop requests.

``train_step`` leaves each step's status on the device (``wsld.engine.step``); the loop hands it
here and asks for a ``read`` once per log window, before any checkpoint and at the end of an
epoch. A read is one host transfer, and under DDP one small all-reduce that also carries the
SIGTERM/SIGINT a rank may have received: no collective and no host sync in between.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor

from wsld.engine.step import LOSS_NOT_FINITE, STAND_IN

DEFAULT_WINDOW = 50  # steps between reads when train.log_every is 0


@dataclass
class Verdict:
    """A step that was not applied: where, and why (``loss``, ``gradients``, or ``empty``: a rank's
    batch had no readable image, so no rank applied it)."""

    epoch: int  # 0-based
    step: int  # 0-based, in the epoch
    global_step: int  # 0-based
    why: str


class StepHealth:
    """The statuses of the steps taken since the last read, and their places."""

    def __init__(self, window: int, distributed: bool, device: torch.device):
        self.window = window or DEFAULT_WINDOW
        self.distributed = distributed
        self.device = device
        self._statuses: list[Tensor] = []
        self._where: list[tuple[int, int, int]] = []

    @property
    def pending(self) -> int:
        return len(self._where)

    def record(self, status: Optional[Tensor], epoch: int, step: int, global_step: int) -> None:
        if status is not None:
            self._statuses.append(status.reshape(1))
            self._where.append((epoch, step, global_step))

    def read(self, signum: Optional[int] = None) -> tuple[list[Verdict], Optional[int]]:
        """The steps not applied since the last read (every rank gets the same list) and the stop
        signal any rank got (``signum`` is this rank's)."""
        n = len(self._where)
        codes = torch.cat(self._statuses) if n else torch.zeros(0, dtype=torch.int32, device=self.device)
        if self.distributed:
            flags = torch.cat([
                torch.tensor([signum or 0], dtype=torch.int32, device=self.device),
                (codes == LOSS_NOT_FINITE).int(), (codes == STAND_IN).int(), (codes != 0).int(),
            ])  # fmt: skip
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
            values = flags.tolist()
            signum = values[0] or None
            loss, empty, bad = values[1 : 1 + n], values[1 + n : 1 + 2 * n], values[1 + 2 * n :]
        else:
            local = codes.tolist()
            loss = [int(c == LOSS_NOT_FINITE) for c in local]
            empty = [int(c == STAND_IN) for c in local]
            bad = [int(c != 0) for c in local]
        verdicts = []
        for k, (e, s, g) in enumerate(self._where):
            if bad[k]:
                why = "loss" if loss[k] else ("empty" if empty[k] else "gradients")
                verdicts.append(Verdict(e, s, g, why))
        self._statuses, self._where = [], []
        return verdicts, signum

