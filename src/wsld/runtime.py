"""The process runtime: torchrun environment and process group, seeds, CPU threads, autocast dtype, memory format."""

from __future__ import annotations

import contextlib
import os
import random
import sys
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import torch
import torch.distributed as dist

from wsld.errors import UserError


@dataclass
class Runtime:
    device: torch.device
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


_workers_said: set[int] = set()


def usable_cores() -> int:
    """The CPU cores this process may run on (its affinity, as torch's DataLoader counts them)."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def loader_workers(requested: int) -> int:
    """``data.workers`` clipped to the usable cores: more loader processes than cores only contend
    (torch warns about it, once per loader); one line says so instead, once per process."""
    cores = usable_cores()
    if requested <= cores:
        return requested
    if requested not in _workers_said and int(os.environ.get("RANK", "0")) == 0:
        _workers_said.add(requested)
        print(f"[wsld] note: data.workers={requested} is more than the {cores} CPU cores this process can use: "
              f"{cores} loader workers", file=sys.stderr, flush=True)
    return cores


def setup_runtime(device: Optional[str] = None) -> Runtime:
    """Read torchrun's environment; start the process group (NCCL on CUDA, gloo on CPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device is None:
        device = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        init_process_group("nccl" if dev.type == "cuda" else "gloo", rank, world)
    return Runtime(dev, rank, world, local_rank)


def init_process_group(backend: str, rank: int, world: int) -> None:
    """``env://`` as torchrun sets it up; after an elastic restart the keys go under this attempt's
    own prefix of the agent's store: the store outlives the attempt, and a restarted rank that read
    a dead rank's address from it failed to connect (gloo) or hung."""
    restart = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)
    if restart and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        from datetime import timedelta

        base = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world, is_master=False,
                             timeout=timedelta(minutes=30))  # fmt: skip
        dist.init_process_group(backend, store=dist.PrefixStore(f"/wsld/attempt_{restart}", base), rank=rank, world_size=world)
    else:
        dist.init_process_group(backend=backend)


def teardown_runtime(rt: Runtime) -> None:
    if rt.distributed and dist.is_initialized():
        dist.destroy_process_group()


def barrier(rt: Runtime) -> None:
    if rt.distributed:
        dist.barrier()


def broadcast_object(rt: Runtime, obj: Any) -> Any:
    if not rt.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def seed_everything(seed: int, deterministic: bool = False, device: Optional[torch.device] = None) -> None:
    """Seed Python, NumPy and torch. ``deterministic``: deterministic algorithms, no cudnn autotuning;
    otherwise cudnn.benchmark is on for CUDA (fixed input shapes: the autotuned kernels win)."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    elif device is not None and device.type == "cuda":
        torch.backends.cudnn.benchmark = True


def cpu_threads(cfg, rt: Runtime) -> Optional[int]:
    """Torch threads for this process (None: leave torch's default, as on CUDA). ``cfg``: a Config
    or its ``train`` section (reads ``threads``)."""
    threads = getattr(getattr(cfg, "train", cfg), "threads")
    if threads > 0:
        return threads
    if rt.device.type == "cuda" or os.environ.get("OMP_NUM_THREADS"):
        return None  # CUDA, or the user set the threads for the process
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", rt.world_size))
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // max(1, local_world))


def set_cpu_threads(cfg, rt: Runtime) -> None:
    n = cpu_threads(cfg, rt)
    if n is not None and n != torch.get_num_threads():
        torch.set_num_threads(n)


def amp_dtype_for(amp: str, device: torch.device) -> Optional[torch.dtype]:
    """Autocast dtype for ``train.amp``. ``auto``: bf16 on CUDA (fp16 + GradScaler on GPUs without
    bf16), off on CPU. fp16 on CPU is refused: CPU autocast is meant for bf16 and a GradScaler is
    only used on CUDA."""
    if amp == "auto":
        if device.type != "cuda":
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if amp == "fp16" and device.type != "cuda":
        raise UserError("config key 'train.amp': fp16 needs a CUDA device; on CPU use train.amp=bf16 or off")
    return {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}[amp]


def autocast(device: torch.device, dtype: Optional[torch.dtype]):
    """``torch.autocast`` for ``dtype``, or a no-op context when autocast is off."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def use_channels_last(channels_last: Optional[bool], device: torch.device) -> bool:
    """``model.channels_last``: null means on for CUDA, off on CPU."""
    return channels_last if channels_last is not None else device.type == "cuda"


# test hook (docs/engine.md): WSLD_COMPILE_BACKEND=eager makes model.compile=true trace with torch.compile's
# eager backend (no C compiler, seconds instead of minutes on a CPU); unset: torch's default (inductor)
COMPILE_BACKEND_ENV = "WSLD_COMPILE_BACKEND"


def compile_module(model: torch.nn.Module) -> torch.nn.Module:
    """``torch.compile(model)`` for ``model.compile=true`` (train's student and live teacher, soft-labels, eval)."""
    backend = os.environ.get(COMPILE_BACKEND_ENV) or "inductor"
    return torch.compile(model, backend=backend)
