"""Preparing the next batch on the device while the current step runs: a side CUDA stream, one batch ahead.

Like timm's PrefetchLoader: batch k+1 is moved, decoded (``data.decode=gpu``), cropped, resized,
flipped and normalised on a side stream while the training stream runs step k; the training
stream waits for exactly that work when batch k+1 becomes current, and its tensors are kept from
reuse until the training stream's work on them is done (``wsld.data.streams``). The loader and
its per-sample generators are untouched, so replay and exact resume are the same as without it.
On a CPU device it is a plain map.
"""

from __future__ import annotations

from typing import Callable, Iterable, Iterator, Optional

import torch

from wsld.data.batch import Batch
from wsld.data.streams import CudaStreams, Streams, device_tensors


def prefetch(loader: Iterable[Batch], prepare: Callable[[Batch], Batch], device: torch.device,
             streams: Optional[Streams] = None) -> Iterator[Batch]:  # fmt: skip
    """``prepare(batch)`` for each loader batch, each one prepared while the previous is in use."""
    if streams is None:
        if device.type != "cuda":
            yield from (prepare(b) for b in loader)
            return
        streams = CudaStreams(device)
    side = streams.new()
    it = iter(loader)
    try:
        first = next(it)
    except StopIteration:
        return
    with streams.use(side):
        ready = prepare(first)
    while True:
        current = streams.current()
        streams.wait(current, side)  # exactly the preparation of `ready`: nothing else is queued there yet
        for t in device_tensors(ready):
            streams.keep_for(t, current)
        try:
            raw = next(it)
        except StopIteration:
            yield ready
            return
        error: Optional[Exception] = None
        with streams.use(side):
            try:
                upcoming = prepare(raw)  # queued before `ready` is handed over: it overlaps `ready`'s step
            except Exception as e:  # noqa: BLE001 - raised after `ready`'s step, where it was raised without prefetching
                error = e
        yield ready
        if error is not None:
            raise error
        ready = upcoming
