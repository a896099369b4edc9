"""The DataLoaders of a run and of ``wsld eval``: uint8 batches, their own generator, workers that leave stopping to the main process."""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch.utils.data import DataLoader

from wsld.data.datasets import collate_skip_corrupt
from wsld.engine.stopping import ignore_stop_signals_in_worker
from wsld.runtime import loader_workers


def make_loader(
    dataset, sampler, batch_size: int, *, workers: int, device: torch.device, drop_last: bool, seed: int = 0,
    collate_fn: Optional[Callable] = None,
) -> DataLoader:
    """A DataLoader over ``sampler`` that moves uint8 batches.

    It gets its own generator: creating an iterator then draws its worker base seed from that
    generator instead of from torch's global RNG, so evaluation or a resume does not shift the
    global random stream that dropout and friends use (exact resume needs that).
    """
    return DataLoader(
        dataset, batch_size=batch_size, sampler=sampler, num_workers=(workers := loader_workers(workers)), collate_fn=collate_fn or collate_skip_corrupt,
        pin_memory=device.type == "cuda", drop_last=drop_last, persistent_workers=False,
        prefetch_factor=4 if workers > 0 else None, generator=torch.Generator().manual_seed(seed),
        worker_init_fn=ignore_stop_signals_in_worker if workers > 0 else None,
    )  # fmt: skip
