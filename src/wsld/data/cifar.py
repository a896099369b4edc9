"""CIFAR-10 and CIFAR-100 from the files their authors distribute (torchvision downloads the same).

Read, in this order of preference, from ``data.data_path`` (the folder itself or its parent, i.e.
torchvision's ``root``):

- the Python versions, ``cifar-10-batches-py/`` (``data_batch_1`` .. ``data_batch_5``, ``test_batch``,
  ``batches.meta``) and ``cifar-100-python/`` (``train``, ``test``, ``meta``): Python-2 pickles of a
  dict with ``data`` (uint8, N x 3072, the red, green then blue 32x32 planes) and ``labels`` /
  ``fine_labels``. They are read with a restricted unpickler that builds only what these files
  hold (dicts, lists, bytes, strings, numbers and numpy arrays): any other global in the stream
  (``os.system`` in a crafted ``__reduce__``, say) stops the read with one line naming the file,
  before anything it names is imported or called.
- the binary versions, ``cifar-10-batches-bin/`` (``data_batch_1.bin`` .. ``data_batch_5.bin``,
  ``test_batch.bin``: records of 1 label byte + 3072 pixel bytes; ``batches.meta.txt``) and
  ``cifar-100-binary/`` (``train.bin``, ``test.bin``: coarse label byte, fine label byte, 3072
  pixel bytes; ``fine_label_names.txt``).

numpy only (no torch), so the data commands can read CIFAR without importing torch.
"""

from __future__ import annotations

import io
import os
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from wsld.errors import DataError

PIXELS = 3 * 32 * 32

try:
    from numpy._core.multiarray import _reconstruct
except ImportError:  # numpy < 2
    from numpy.core.multiarray import _reconstruct  # type: ignore[no-redef]

# the only globals a CIFAR pickle names: numpy's array reconstruction (its module was renamed in
# numpy 2; the files, written by numpy 1 under Python 2, name the old one). Looked up here, never
# imported by the name in the file.
ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
}


@dataclass(frozen=True)
class CifarLayout:
    """Where one variant of a CIFAR dataset keeps its files."""

    folder: str  # the folder name in the download
    train: tuple[str, ...]
    test: tuple[str, ...]
    meta: str
    binary: bool


LAYOUTS: dict[str, tuple[CifarLayout, CifarLayout]] = {
    "cifar10": (
        CifarLayout("cifar-10-batches-py", tuple(f"data_batch_{i}" for i in range(1, 6)), ("test_batch",),
                    "batches.meta", False),
        CifarLayout("cifar-10-batches-bin", tuple(f"data_batch_{i}.bin" for i in range(1, 6)), ("test_batch.bin",),
                    "batches.meta.txt", True),
    ),
    "cifar100": (
        CifarLayout("cifar-100-python", ("train",), ("test",), "meta", False),
        CifarLayout("cifar-100-binary", ("train.bin",), ("test.bin",), "fine_label_names.txt", True),
    ),
}  # fmt: skip
NUM_CLASSES = {"cifar10": 10, "cifar100": 100}
SPLITS = {"train": "train", "val": "test", "test": "test"}


class RefusedGlobal(pickle.UnpicklingError):
    """The stream names a global that no CIFAR file holds."""


class _CifarUnpickler(pickle.Unpickler):
    """Builds dicts, lists, bytes, str, numbers and numpy arrays; refuses every other global."""

    def find_class(self, module: str, name: str):
        found = ALLOWED_GLOBALS.get((module, name))
        if found is not None:
            return found
        raise RefusedGlobal(f"it names '{module}.{name}'")


def read_pickle(path: Path) -> dict:
    """One CIFAR pickle as a dict with str keys (Python-2 files: bytes keys, read with ``encoding='bytes'``)."""
    try:
        with open(path, "rb") as f:
            obj = _CifarUnpickler(io.BytesIO(f.read()), encoding="bytes").load()
    except RefusedGlobal as e:
        raise DataError(
            f"{path} is not a CIFAR file: {e}, and a CIFAR pickle holds only dicts, lists, bytes and numpy arrays "
            f"(refused before anything in it ran)"
        ) from None
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror or e}") from None
    except Exception as e:  # truncated or not a pickle: EOFError, ValueError, ...
        raise DataError(f"{path} is not a readable CIFAR pickle ({type(e).__name__}: {str(e)[:120]})") from None
    if not isinstance(obj, dict):
        raise DataError(f"{path} is not a CIFAR file: it holds a {type(obj).__name__}, not a dict")
    return {(k.decode("latin1") if isinstance(k, bytes) else str(k)): v for k, v in obj.items()}


def _text(value) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def _pickled_batch(path: Path, label_key: str, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    d = read_pickle(path)
    if "data" not in d or label_key not in d:
        raise DataError(f"{path} has no '{'data' if 'data' not in d else label_key}' entry: not a {num_classes}-class CIFAR batch")
    data, labels = d["data"], d[label_key]
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != PIXELS:
        shape = getattr(data, "shape", type(data).__name__)
        raise DataError(f"{path}: 'data' must be a uint8 array of N x {PIXELS} pixels, found {shape}")
    try:
        labels = np.asarray(labels, dtype=np.int64).reshape(-1)
    except (TypeError, ValueError):
        raise DataError(f"{path}: '{label_key}' must be a list of integers") from None
    if len(labels) != len(data):
        raise DataError(f"{path}: {len(data)} images but {len(labels)} labels in '{label_key}'")
    return data, labels


def _binary_batch(path: Path, label_bytes: int) -> tuple[np.ndarray, np.ndarray]:
    try:
        raw = np.fromfile(path, dtype=np.uint8)
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror or e}") from None
    record = label_bytes + PIXELS
    if raw.size == 0 or raw.size % record:
        raise DataError(f"{path} is not a CIFAR binary file: {raw.size} bytes is not a multiple of {record}-byte records")
    rows = raw.reshape(-1, record)
    return rows[:, label_bytes:], rows[:, label_bytes - 1].astype(np.int64)  # the last label byte is the (fine) label


def _classes(layout: CifarLayout, folder: Path, num_classes: int) -> list[str]:
    path = folder / layout.meta
    if not path.is_file():
        raise DataError(f"{folder} has no {layout.meta} (the class names): expected the whole {layout.folder} folder")
    if layout.binary:
        try:
            names = [line.strip() for line in path.read_text(encoding="utf-8", errors="replace").splitlines()]
        except OSError as e:
            raise DataError(f"cannot read {path}: {e.strerror or e}") from None
        names = [n for n in names if n]
    else:
        key = "label_names" if num_classes == 10 else "fine_label_names"
        meta = read_pickle(path)
        if not isinstance(meta.get(key), (list, tuple)):
            raise DataError(f"{path} has no '{key}' list: not the meta file of CIFAR-{num_classes}")
        names = [_text(n) for n in meta[key]]
    if len(names) != num_classes:
        raise DataError(f"{path} names {len(names)} classes, CIFAR-{num_classes} has {num_classes}")
    return names


def find_cifar(name: str, data_path: Optional[str]) -> tuple[CifarLayout, Path]:
    """The layout and folder of dataset ``name`` under ``data_path`` (the folder itself or its parent)."""
    layouts = LAYOUTS[name]
    expected = " or ".join(f"{lay.folder}/" for lay in layouts)
    if not data_path:
        raise DataError(
            f"data.data_path is required for {name}: give the folder holding {expected} "
            f"(torchvision's root, e.g. after torchvision.datasets.{name.upper()}(root, download=True)) or that folder itself"
        )
    root = Path(os.path.expanduser(data_path))
    if not root.is_dir():
        raise DataError(f"data.data_path {root} is not a folder: give the folder holding {expected}")
    for folder in (root, *(root / lay.folder for lay in layouts)):
        for lay in layouts:
            if (folder / lay.train[0]).is_file() or (folder / lay.test[0]).is_file():
                return lay, folder
    raise DataError(
        f"no {name} files in {root}: expected {expected} there (or data.data_path pointing at one of them), "
        f"e.g. {layouts[0].folder}/{layouts[0].train[0]}"
    )


def load_cifar(name: str, split: str, data_path: Optional[str]) -> tuple[np.ndarray, list[int], list[str]]:
    """Images (uint8, N x 3 x 32 x 32), labels and class names of one split (``train``; ``val`` = ``test``)."""
    if split not in SPLITS:
        raise DataError(f"{name} has splits 'train' and 'val' (the 10,000 test images; 'test' also works), not '{split}'")
    num_classes = NUM_CLASSES[name]
    layout, folder = find_cifar(name, data_path)
    files = layout.train if SPLITS[split] == "train" else layout.test
    missing = [f for f in files if not (folder / f).is_file()]
    if missing:
        raise DataError(f"{folder} lacks {', '.join(missing)}: expected the whole {layout.folder} folder ({', '.join(files)})")
    classes = _classes(layout, folder, num_classes)
    parts = []
    for f in files:
        if layout.binary:
            parts.append(_binary_batch(folder / f, 1 if num_classes == 10 else 2))
        else:
            parts.append(_pickled_batch(folder / f, "labels" if num_classes == 10 else "fine_labels", num_classes))
    data = np.concatenate([p[0] for p in parts]) if len(parts) > 1 else parts[0][0]
    labels = np.concatenate([p[1] for p in parts])
    bad = labels[(labels < 0) | (labels >= num_classes)]
    if bad.size:
        raise DataError(f"{folder}: label {int(bad[0])} is outside 0..{num_classes - 1} (not CIFAR-{num_classes} data?)")
    return np.ascontiguousarray(data.reshape(-1, 3, 32, 32)), labels.tolist(), classes
