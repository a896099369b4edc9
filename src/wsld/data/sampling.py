"""Deterministic, resumable sampling.

Every training sample is drawn as a pair ``(index, sample_seed)``. The seed is a pure function of
(run seed, epoch, index), and the dataset seeds its random augmentation with it. So a sample's crop
and flip do not depend on DataLoader workers, on the number of processes, or on whether the run
was interrupted and resumed mid-epoch: resume skips the batches already done and replays the rest
exactly.
"""

from __future__ import annotations

import contextlib
import math
from typing import Iterator, Optional

import torch
from torch.utils.data import Sampler, get_worker_info

_MIX = 0x9E3779B97F4A7C15
_MASK = (1 << 63) - 1


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A 63-bit seed for one sample in one epoch (splitmix-style mixing, stable across versions)."""
    x = (seed * _MIX + epoch * 0xBF58476D1CE4E5B9 + index * 0x94D049BB133111EB) & ((1 << 64) - 1)
    x ^= x >> 31
    x = (x * 0xBF58476D1CE4E5B9) & ((1 << 64) - 1)
    x ^= x >> 29
    return x & _MASK


@contextlib.contextmanager
def seeded_rng(seed: Optional[int]):
    """Seed torch's global RNG for a transform. In the main process the caller's RNG state is restored."""
    if seed is None:
        yield
        return
    if get_worker_info() is not None:  # a worker process: its global RNG is ours alone
        torch.manual_seed(seed)
        yield
        return
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def split_key(key) -> tuple[int, Optional[int]]:
    """Dataset keys are ``index`` or ``(index, seed)``."""
    if isinstance(key, (tuple, list)):
        return int(key[0]), int(key[1])
    return int(key), None


class ResumableSampler(Sampler):
    """Shuffled (or ordered) sharded sampler with an exact mid-epoch start.

    The epoch's permutation is drawn from ``seed + epoch``; it is padded by wrap-around to a
    multiple of ``world_size`` (training) and rank ``r`` takes positions ``r, r + W, ...``, so the
    union of the ranks' batch ``k`` is the global batch ``k``. ``start_batch`` skips the first
    batches of the epoch on resume. For evaluation use ``pad=False``: no sample is counted twice.
    """

    def __init__(
        self,
        num_samples: int,
        *,
        batch_size: int,
        seed: int = 0,
        shuffle: bool = True,
        rank: int = 0,
        world_size: int = 1,
        pad: bool = True,
        with_seeds: bool = True,
    ):
        self.num_samples = num_samples
        self.batch_size = batch_size  # per process
        self.seed, self.shuffle, self.rank, self.world_size = seed, shuffle, rank, world_size
        self.pad, self.with_seeds = pad, with_seeds
        self.epoch = 0
        self.start_batch = 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start_batch = epoch, start_batch

    def _indices(self) -> list[int]:
        if self.shuffle:
            g = torch.Generator().manual_seed((self.seed * 1_000_003 + self.epoch) & ((1 << 64) - 1))  # any int64 seed
            order = torch.randperm(self.num_samples, generator=g).tolist()
        else:
            order = list(range(self.num_samples))
        if self.pad and self.world_size > 1:
            total = math.ceil(self.num_samples / self.world_size) * self.world_size
            order = (order * math.ceil(total / max(1, len(order))))[:total]
        return order[self.rank :: self.world_size]

    def __iter__(self) -> Iterator:
        mine = self._indices()[self.start_batch * self.batch_size :]
        for i in mine:
            yield (i, sample_seed(self.seed, self.epoch, i)) if self.with_seeds else i

    def __len__(self) -> int:
        n = len(self._indices())
        return max(0, n - self.start_batch * self.batch_size)

    def batches_per_epoch(self, drop_last: bool) -> int:
        n = len(self._indices())
        return n // self.batch_size if drop_last else math.ceil(n / self.batch_size)
