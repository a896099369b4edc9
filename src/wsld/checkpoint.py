"""The checkpoint schema: what a wsld checkpoint holds, the one writer and the one reader (format tag and CRCs checked).

A checkpoint is one torch file readable with ``torch.load(weights_only=True)``: only tensors,
numbers, strings, lists, tuples and dicts. It is written to a temporary file in the same folder,
flushed and fsynced, then renamed over the final name (``wsld.files``), so a crash at any moment
leaves either the previous file or the new one, never a half-written file under a final name.
Reading checks the zip CRC of every member (a flipped bit is refused, not trained on) and the
format tag (a file of another format or of a newer wsld is refused with one line).
"""

from __future__ import annotations

import glob
import io
import os
import random
import warnings
import zipfile
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from torch import Tensor

from wsld.errors import CheckpointError
from wsld.file_kinds import describe_file
from wsld.files import atomic_write_bytes

FORMAT_NAME = "wsld-checkpoint"
FORMAT_VERSION = 1  # the schema below; readers accept 1..FORMAT_VERSION
FORMAT = f"{FORMAT_NAME}-{FORMAT_VERSION}"

# What a training checkpoint holds (the trainer fills every key; readers use .get for the optional ones):
#   format                 FORMAT
#   student                student state dict (CPU tensors, no DDP/compile prefixes)
#   student_arch           model.student name; num_classes; classes (class names in label order)
#   optimizer, scheduler, scaler   their state dicts (scaler None without fp16)
#   ema, ema_n_averaged    EMA state dict or None
#   epoch, step_in_epoch, global_step   where training continues (step_in_epoch > 0: mid-epoch)
#   epoch_stats            per-rank running sums of a partial epoch, or None
#   best_top1, best_epoch, teacher_eval, skipped_steps, corrupt_count, metrics_lines, world_size
#   rng                    per-rank RNG states (rng_state())
#   config                 the run's resolved config as a dict
#   data_identity          the identity of the data it was trained on (wsld.data.identity; None before it existed)

# test hook: WSLD_TEST_SLOW_SAVE=<seconds> pauses every checkpoint write half-way (tests/test_reliability_*)
SLOW_SAVE_ENV = "WSLD_TEST_SLOW_SAVE"


def save_checkpoint(state: dict[str, Any], path: str | Path) -> None:
    """Write ``state`` (tagged with ``FORMAT``) atomically; temp files of this name left by a killed
    earlier write go first (one process writes a run's checkpoints, so any such file is stale)."""
    path = Path(path)
    for stale in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
        try:
            stale.unlink()
        except OSError:
            pass
    buf = io.BytesIO()
    torch.save({**state, "format": FORMAT}, buf)
    try:
        atomic_write_bytes(path, buf.getvalue(), pause_s=float(os.environ.get(SLOW_SAVE_ENV) or 0))
    except OSError as e:  # disk filled up or went away during the run: the previous file is intact
        kept = f"the previous {path.name} is intact" if path.is_file() else f"no {path.name} was written"
        raise CheckpointError(
            f"could not write checkpoint {path} ({e.strerror or e}); {kept}: free space, then continue with "
            f"wsld train --resume {path.parent}"
        ) from None


def save_weights(state: dict[str, Tensor], path: str | Path) -> None:
    """Weights only, as safetensors, atomically (the teacher cache's ``teacher.safetensors``)."""
    from safetensors.torch import save

    atomic_write_bytes(path, save({k: v.detach().cpu().contiguous() for k, v in state.items()}))


def _first_line(e: BaseException) -> str:
    return ((str(e).strip().splitlines() or [type(e).__name__])[0])[:200]


def damaged_member(path: Path) -> Optional[str]:
    """The first zip member whose CRC does not match (None: all intact, or not a zip file)."""
    try:
        with zipfile.ZipFile(path) as z:
            return z.testzip()
    except zipfile.BadZipFile:
        return "the zip directory"
    except (OSError, EOFError, ValueError, RuntimeError) as e:  # truncated inside a member
        return f"a truncated member ({_first_line(e)})"


EXPECTED = "expected a wsld checkpoint: a run's last.pt, best.pt or epoch_<n>.pt"


def _torch_load(p: Path, unreadable: str = "{path} is not a loadable wsld checkpoint: it is {why}; " + EXPECTED) -> Any:
    """``torch.load(weights_only=True)`` after the CRC check, errors as one line."""
    bad = damaged_member(p) if zipfile.is_zipfile(p) else None
    if bad is not None:
        hint = ""
        best = p.with_name("best.pt")
        if p.name == "last.pt" and best.is_file() and zipfile.is_zipfile(best) and damaged_member(best) is None:
            hint = f"; {best} is intact: evaluate or export it, or copy it over {p.name} to resume from it"
        raise CheckpointError(f"{p} is damaged (CRC mismatch in {bad}): refused{hint}")
    try:
        with warnings.catch_warnings():  # torch warns about legacy pickles on its way to refusing them
            warnings.simplefilter("ignore")
            return torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:
        kind = describe_file(p)
        if kind == "a PyTorch file":
            why = "a PyTorch file holding Python objects that safe loading (weights_only) refuses, e.g. a whole model saved with torch.save(model)"
        else:
            why = kind
        raise CheckpointError(unreadable.format(path=p, why=why)) from None


def check_format(obj: dict[str, Any], p: Path) -> None:
    """Refuse a file of another format or a newer version with one line naming both."""
    tag = obj.get("format")
    prefix = f"{FORMAT_NAME}-"
    if not isinstance(tag, str) or not tag.startswith(prefix) or not tag[len(prefix):].isdigit():
        found = f"format '{tag}'" if tag is not None else "no format tag"
        raise CheckpointError(f"{p}: {found} found, expected {FORMAT} (not a wsld checkpoint)")
    version = int(tag[len(prefix):])
    if not 1 <= version <= FORMAT_VERSION:
        raise CheckpointError(
            f"{p}: format '{tag}' found, this wsld reads {FORMAT_NAME}-1 to {FORMAT}: "
            "use the wsld version that wrote it (or a newer one)"
        )


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a wsld checkpoint safely (``weights_only=True``: a pickle carrying code is refused),
    its CRCs and format tag checked."""
    p = Path(path)
    if p.is_dir():
        inside = [n for n in ("last.pt", "best.pt") if (p / n).is_file()]
        hint = f" (this one holds {' and '.join(inside)}: e.g. {p / inside[0]})" if inside else ""
        raise CheckpointError(f"{p} is a folder, not a checkpoint file: give the checkpoint inside a run folder{hint}")
    if not p.is_file():
        raise CheckpointError(f"checkpoint not found: {p}")
    if p.suffix == ".safetensors" or describe_file(p).startswith("a safetensors"):
        raise CheckpointError(f"{p} is a safetensors file (weights only), not a wsld checkpoint: {EXPECTED}")
    obj = _torch_load(p)
    if not isinstance(obj, dict) or "student" not in obj:
        raise CheckpointError(
            f"{p} is a PyTorch file but not a wsld checkpoint (no 'student' entry: a plain state dict or another "
            f"tool's checkpoint?); {EXPECTED}. Plain weights go in model.student_weights or model.teacher_weights"
        )
    check_format(obj, p)
    return obj


def student_state(ck: dict[str, Any], path: str | Path, ema: bool = False) -> dict[str, Tensor]:
    """The student's (or its EMA's) state dict from a loaded checkpoint, prefixes removed."""
    if ema:
        if ck.get("ema") is None:
            raise CheckpointError(f"{path} holds no EMA weights (train.ema_decay was 0)")
        return {k.removeprefix("module."): v for k, v in ck["ema"].items() if k != "n_averaged"}
    return ck["student"]


def read_weights(path: str | Path) -> dict[str, Tensor]:
    """A state dict from a local file: safetensors, a bare torch state dict, or a wsld checkpoint
    (its ``student``), read with ``weights_only=True``; a wsld checkpoint's CRCs and format are checked."""
    p = Path(os.path.expanduser(str(path)))
    if not p.is_file():
        raise CheckpointError(f"weight file not found: {p}")
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(p))
        except Exception as e:
            raise CheckpointError(f"{p} is not a readable safetensors file ({_first_line(e)})") from None
    obj = _torch_load(p, "{path} is not a loadable weights file (refused or unreadable with weights_only=True: {why})")
    if isinstance(obj, dict) and "format" in obj and "student" in obj:
        check_format(obj, p)
    if isinstance(obj, dict):
        for key in ("student", "model", "state_dict"):
            if key in obj and isinstance(obj[key], dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{p} holds no state dict of tensors (expected weights or a wsld checkpoint)")
    return {k.removeprefix("module.").removeprefix("_orig_mod."): v for k, v in obj.items()}


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


def user_module_of(name: str) -> Optional[str]:
    """The module a model name ``package.module:callable`` would import, or None for built-in names."""
    if ":" not in name or name.startswith("timm/"):
        return None
    return name.partition(":")[0] or None


def refuse_unnamed_import(name: str, source: str | Path, named: bool, allowed: bool) -> None:
    """A model name taken from a file (a checkpoint, its config) that would import the user's code is
    imported only when the user named it on the command line (``named``) or opted in (``allowed``):
    importing runs the module's code before anything else is checked."""
    module = user_module_of(name)
    if module is None or named or allowed:
        return
    raise CheckpointError(
        f"{source} names its student '{name}', which would import module '{module}' (running its code): if you trust "
        f"it, add --allow-import, or name it yourself with model.student={name}"
    )
