"""Fashion-MNIST subsets written as IDX files for the built-in loader (``wsld demo --quick``'s small data)."""

from __future__ import annotations

import os
import shutil
import struct
import time
from pathlib import Path
from typing import Callable, Optional


# the built-in loader's file names (wsld.data.builtin) for its two splits
IDX_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
             "val": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}  # fmt: skip
# folder split -> (Fashion-MNIST split, images per class to skip, images per class or None for all)
SplitPlan = dict[str, tuple[str, int, Optional[int]]]


def selected(labels: list[int], per_class: Optional[int], skip: int = 0) -> list[int]:
    """Indices to keep: per class the images ``skip`` .. ``skip + per_class - 1`` in file order (all: None)."""
    seen: dict[int, int] = {}
    keep = []
    for i, y in enumerate(labels):
        n = seen.get(y, 0)
        seen[y] = n + 1
        if n >= skip and (per_class is None or n < skip + per_class):
            keep.append(i)
    return keep


def write_idx_subset(root: Path, plan: SplitPlan, source: Optional[str], log: Callable[[str], None]) -> Path:
    """Write ``root/{train,t10k}-*-idx?-ubyte`` as ``plan`` says; written to a temporary folder renamed
    at the end, so ``root`` exists only when complete."""
    import numpy as np

    from wsld.data.builtin import load_fashion_mnist

    if root.is_dir():
        return root
    tmp = root.parent / f".{root.name}.partial"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    t0 = time.perf_counter()
    counts = []
    for split, (source_split, skip, per_class) in plan.items():
        images, labels = load_fashion_mnist(source_split, source)
        keep = selected(labels, per_class, skip)
        pixels = images[keep, 0].numpy().astype(np.uint8)
        ys = np.asarray(labels, dtype=np.uint8)[keep]
        img_name, lbl_name = IDX_FILES[split]
        n, h, w = pixels.shape
        (tmp / img_name).write_bytes(struct.pack(">IIII", 0x803, n, h, w) + pixels.tobytes())
        (tmp / lbl_name).write_bytes(struct.pack(">II", 0x801, n) + ys.tobytes())
        counts.append(f"{split} {n:,}")
    os.replace(tmp, root)
    log(f"wrote {root} ({', '.join(counts)} images, {time.perf_counter() - t0:.1f} s)")
    return root
