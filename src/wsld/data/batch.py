"""The training batch: what a loader hands the training loop, as one typed value."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from torch import Tensor


@dataclass
class Batch:
    """One loader batch.

    ``images`` are uint8 NCHW on the CPU (normalised on the device by the loop); ``corrupt`` holds
    the markers of samples that could not be decoded (already dropped from ``images``);
    ``teacher_records`` carries stored soft labels for exactly these samples when the teacher
    source replays a store (``wsld.teachers.stored``), else None. ``encoded`` is for decode paths
    that decode on the device (the images are then built there, ``images`` may be None).
    """

    images: Optional[Tensor]
    targets: Tensor
    corrupt: list = field(default_factory=list)
    teacher_records: Optional[dict[str, Tensor]] = None
    encoded: Optional[Any] = None

    def __len__(self) -> int:
        return int(self.targets.shape[0])

    def pin_memory(self) -> "Batch":
        """The DataLoader's pin-memory thread calls this (CUDA runs): page-locked images, targets and
        records copy to the device asynchronously (a dataclass is otherwise passed through unpinned)."""
        def pin(t: Optional[Tensor]) -> Optional[Tensor]:
            return t.pin_memory() if isinstance(t, Tensor) else t

        records = {k: pin(v) for k, v in self.teacher_records.items()} if self.teacher_records is not None else None
        return Batch(pin(self.images), pin(self.targets), self.corrupt, records, self.encoded)  # type: ignore[arg-type]


def collate_batch(samples: list) -> Batch:
    """Default train collate: the good samples stacked, corrupt markers set aside."""
    from wsld.data.datasets import collate_skip_corrupt

    images, targets, bad = collate_skip_corrupt(samples)
    return Batch(images, targets, bad)
