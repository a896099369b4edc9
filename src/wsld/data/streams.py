"""The CUDA stream discipline of device-side data work: which stream runs what, and how its outputs reach the training stream.

Rules (docs/data.md "GPU decoding"): JPEG decoding runs on a stream that holds nothing else; the
rest of a batch's preparation runs on a side stream; whatever a stream produced is handed on with
``wait`` (the consumer's later work waits for it) and ``keep_for`` (``record_stream``: the caching
allocator does not give its memory to another allocation until the consumer's queued work is
done). Never a device-wide synchronize. ``CudaStreams`` is the real thing; tests pass an object
with the same methods to watch the discipline on a machine without CUDA.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import Any, Protocol

import torch
from torch import Tensor


class Streams(Protocol):
    def new(self) -> Any: ...
    def current(self) -> Any: ...
    def use(self, stream: Any) -> AbstractContextManager: ...
    def wait(self, waiter: Any, producer: Any) -> None: ...
    def keep_for(self, tensor: Tensor, stream: Any) -> None: ...


class CudaStreams:
    """``Streams`` on one CUDA device."""

    def __init__(self, device: torch.device):
        self.device = device

    def new(self) -> torch.cuda.Stream:
        return torch.cuda.Stream(self.device)

    def current(self) -> torch.cuda.Stream:
        return torch.cuda.current_stream(self.device)

    def use(self, stream: torch.cuda.Stream) -> AbstractContextManager:
        return torch.cuda.stream(stream)

    def wait(self, waiter: torch.cuda.Stream, producer: torch.cuda.Stream) -> None:
        waiter.wait_stream(producer)

    def keep_for(self, tensor: Tensor, stream: torch.cuda.Stream) -> None:
        if tensor.is_cuda:
            tensor.record_stream(stream)


def device_tensors(obj: Any) -> list[Tensor]:
    """The tensors of a batch (its fields, lists and dicts of them), for ``keep_for``."""
    if isinstance(obj, Tensor):
        return [obj]
    if isinstance(obj, dict):
        return [t for v in obj.values() for t in device_tensors(v)]
    if isinstance(obj, (list, tuple)):
        return [t for v in obj for t in device_tensors(v)]
    if hasattr(obj, "__dataclass_fields__"):
        return [t for k in obj.__dataclass_fields__ for t in device_tensors(getattr(obj, k))]
    return []
