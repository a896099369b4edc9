"""The demo's data: Fashion-MNIST exported as an ImageNet-shaped photo folder, listed and packed into LMDB."""

from __future__ import annotations

import os
import re
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Optional

from wsld.demo.plan import Settings

def class_folder_names(classes: list[str]) -> list[str]:
    """``0_T-shirt_top`` ...: the label first, so sorted folder order is label order."""
    width = len(str(len(classes) - 1))
    return [f"{k:0{width}d}_{re.sub(r'[^A-Za-z0-9-]+', '_', name).strip('_')}" for k, name in enumerate(classes)]


def data_folder_name(train_per_class: Optional[int], val_per_class: Optional[int]) -> str:
    if train_per_class is None and val_per_class is None:
        return "fashion-mnist"
    return f"fashion-mnist-{train_per_class or 'all'}-{val_per_class or 'all'}"


def _selected(labels: list[int], per_class: Optional[int], skip: int = 0) -> list[int]:
    """Indices to export: all, or per class the images ``skip`` .. ``skip + per_class - 1`` in file order."""
    if per_class is None and not skip:
        return list(range(len(labels)))
    seen: dict[int, int] = {}
    keep = []
    for i, y in enumerate(labels):
        n = seen.get(y, 0)
        seen[y] = n + 1
        if n >= skip and (per_class is None or n < skip + per_class):
            keep.append(i)
    return keep


# folder split -> (Fashion-MNIST split, images per class to skip, images per class or None for all)
ExportPlan = dict[str, tuple[str, int, Optional[int]]]


def export_fashion_mnist(root: Path, plan: ExportPlan, source: Optional[str] = None, workers: int = 2,
                         log: Callable[[str], None] = print) -> Path:
    """Write Fashion-MNIST images as ``root/<split>/<class>/<index>.png`` (grey PNGs) as ``plan`` says.

    Written into a temporary folder renamed at the end, so ``root`` exists only when complete; an
    export interrupted half-way is started again next time.
    """
    import numpy as np
    from PIL import Image

    from wsld.data.builtin import FASHION_MNIST_CLASSES, load_fashion_mnist

    if root.is_dir():
        return root
    tmp = root.parent / f".{root.name}.partial"
    if tmp.exists():
        shutil.rmtree(tmp)
    folders = class_folder_names(FASHION_MNIST_CLASSES)
    t0 = time.perf_counter()
    total = 0
    for split, (source_split, skip, per_class) in plan.items():
        images, labels = load_fashion_mnist(source_split, source)
        pixels = images[:, 0].numpy()
        keep = _selected(labels, per_class, skip)
        width = len(str(len(labels) - 1))
        for name in folders:
            (tmp / split / name).mkdir(parents=True, exist_ok=True)

        def write(i: int) -> None:
            path = tmp / split / folders[labels[i]] / f"{i:0{width}d}.png"
            Image.fromarray(np.ascontiguousarray(pixels[i])).save(path)

        with ThreadPoolExecutor(max(1, workers)) as pool:
            list(pool.map(write, keep, chunksize=256))
        total += len(keep)
    os.replace(tmp, root)
    log(f"exported {total:,} Fashion-MNIST images as PNG files to {root} ({time.perf_counter() - t0:.0f} s)")
    return root


def prepare_data(root: Path, plan: ExportPlan, s: Settings, log: Callable[[str], None]) -> tuple[Path, list[str]]:
    """Export, ``wsld data list``, ``wsld data pack`` (train and val): the LMDB folder and the
    commands a user would have typed."""
    from wsld.data.lists import write_lists
    from wsld.data.lmdb_reader import open_lmdb_index
    from wsld.data.pack import pack_lmdb
    from wsld.errors import DataError

    lmdb_dir = root / "lmdb"
    commands = [f"wsld data list {root}"] + [f"wsld data pack {root} --split {split}" for split in ("train", "val")]

    def complete() -> bool:
        try:
            for split in ("train", "val"):
                open_lmdb_index(lmdb_dir / split, require_complete=True)
        except (DataError, OSError):
            return False
        return True

    if root.is_dir() and complete():
        log(f"data: reusing {lmdb_dir}")
        return lmdb_dir, commands
    export_fashion_mnist(root, plan, s.source, workers=max(2, s.jobs), log=log)
    lists = write_lists(root, log=log)
    log(f"wsld data list {root}: " + ", ".join(f"{k} {len(v):,} images" for k, v in lists.items()))
    for split in ("train", "val"):
        res = pack_lmdb(root, split, workers=max(2, s.jobs), progress=False, log=log)
        log(f"wsld data pack {root} --split {split}: {res.count:,} images in {res.path}")
    return lmdb_dir, commands

