"""Atomic, self-contained checkpoints.

A checkpoint is one torch file readable with ``torch.load(weights_only=True)``: only tensors,
numbers, strings, lists, tuples and dicts. It is written to a temporary file in the same folder,
flushed and fsynced, then renamed over the final name, so a crash at any moment leaves either the
previous file or the new one, never a half-written file under a final name.
"""

from __future__ import annotations

import glob
import io
import os
import random
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from wsld.errors import CheckpointError


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | Path, data: bytes, *, pause_s: float = 0.0) -> None:
    """Write ``data`` to ``path`` via temp file + fsync + rename.

    ``pause_s`` (tests only) sleeps with half of the data written to the temp file, so a test
    can kill the process in the middle of a write.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            if pause_s > 0:
                half = len(data) // 2
                f.write(data[:half])
                f.flush()
                os.fsync(f.fileno())
                time.sleep(pause_s)
                data = data[half:]
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    _fsync_dir(path.parent)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


# test hook: WSLD_TEST_SLOW_SAVE=<seconds> pauses every checkpoint write half-way (tests/test_reliability_*)
SLOW_SAVE_ENV = "WSLD_TEST_SLOW_SAVE"


def save_checkpoint(state: dict[str, Any], path: str | Path) -> None:
    """Write ``state`` atomically; temp files of this name left by a killed earlier write go first
    (one process writes a run's checkpoints, so any such file is stale)."""
    path = Path(path)
    for stale in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
        try:
            stale.unlink()
        except OSError:
            pass
    buf = io.BytesIO()
    torch.save(state, buf)
    try:
        atomic_write_bytes(path, buf.getvalue(), pause_s=float(os.environ.get(SLOW_SAVE_ENV) or 0))
    except OSError as e:  # disk filled up or went away during the run: the previous file is intact
        kept = f"the previous {path.name} is intact" if path.is_file() else f"no {path.name} was written"
        raise CheckpointError(
            f"could not write checkpoint {path} ({e.strerror or e}); {kept}: free space, then continue with "
            f"wsld train --resume {path.parent}"
        ) from None


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a wsld checkpoint safely (``weights_only=True``: a pickle carrying code is refused)."""
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"checkpoint not found: {p}")
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise CheckpointError(f"{p} is not a loadable wsld checkpoint ({first[:200]})") from None
    if not isinstance(obj, dict) or "student" not in obj:
        raise CheckpointError(f"{p} is not a wsld checkpoint (no 'student' entry)")
    return obj


def rng_state() -> dict[str, Any]:
    """All RNG states as weights_only-safe values (NumPy's state as a tensor plus ints)."""
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": (np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), int(np_state[2]), int(np_state[3]), float(np_state[4])),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(_tuplify(state["python"]))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _tuplify(x):
    if isinstance(x, list):
        return tuple(_tuplify(v) for v in x)
    return x
