"""The torch side of ``wsld.data``: ``build_datasets`` (train/val datasets for a ``DataConfig``),
``SubsetWithTargets`` and the long-tail subset. Kept out of the package ``__init__`` so that
``wsld data list | pack | verify``, which never need torch, start without importing it.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from torch.utils.data import Dataset, Subset

from wsld.data import IMAGENET_MEAN, IMAGENET_STD, DataInfo
from wsld.errors import DataError


def long_tail_indices(targets: list[int], num_classes: int, ratio: float, seed: int = 0) -> list[int]:
    """CIFAR-LT construction: class k keeps ``n_max * ratio^(-k/(C-1))`` images (a fixed random subset)."""
    t = np.asarray(targets)
    n_max = max(int((t == k).sum()) for k in range(num_classes))
    rng = np.random.default_rng(seed)
    keep: list[int] = []
    for k in range(num_classes):
        idx = np.flatnonzero(t == k)
        n_k = int(n_max * ratio ** (-k / max(1, num_classes - 1)))
        n_k = max(1, min(len(idx), n_k))
        keep.extend(rng.permutation(idx)[:n_k].tolist())
    return sorted(keep)


def holdout_split(targets: list[int], num_classes: int, share: float, seed: int = 0) -> tuple[list[int], list[int]]:
    """(kept, held out) positions: per class ``round(share * n)`` images drawn at random (at least 1, and
    at least 1 left to train on, for a class of 2 or more), the same draw whatever the run's seed."""
    t = np.asarray(targets)
    rng = np.random.default_rng(seed)
    held: list[int] = []
    for k in range(num_classes):
        idx = np.flatnonzero(t == k)
        n = len(idx)
        n_held = min(max(1, round(share * n)), n - 1) if n >= 2 else 0
        held.extend(rng.permutation(idx)[:n_held].tolist())
    held_set = set(held)
    return [i for i in range(len(t)) if i not in held_set], sorted(held)


class SubsetWithTargets(Subset):
    """A Subset that keeps ``targets``/``classes`` and passes ``(index, seed)`` keys through."""

    def __init__(self, dataset: Dataset, indices: list[int]):
        super().__init__(dataset, indices)
        self.targets = [dataset.targets[i] for i in indices]  # type: ignore[attr-defined]
        self.classes = dataset.classes  # type: ignore[attr-defined]

    def __getitem__(self, key):
        if isinstance(key, (tuple, list)):
            return self.dataset[(self.indices[key[0]], key[1])]
        return self.dataset[self.indices[key]]

    def __getitems__(self, keys):  # torch refuses a Subset that overrides only __getitem__
        return [self[k] for k in keys]


def build_datasets(cfg, seed: int = 0) -> tuple[Dataset, Dataset, DataInfo]:
    """Train and val datasets for a ``DataConfig``; the single entry point the engine uses.

    With ``data.holdout`` the val split is not read: "val" is the training split through the val
    transforms, cut to the held-out images below.
    """
    val_split = cfg.train_split if cfg.holdout > 0 else cfg.val_split
    if cfg.format == "builtin":
        from wsld.data.builtin import build_builtin

        train, spec = build_builtin(cfg.dataset, cfg.train_split, cfg.data_path, True, cfg.augment, cfg.hflip)
        val, _ = build_builtin(cfg.dataset, val_split, cfg.data_path, False, False, False)
        in_channels, size = int(train.images.shape[1]), int(train.images.shape[-1])
        mean, std = spec["mean"], spec["std"]
    else:
        from wsld.data.datasets import build_image_datasets

        train, val = build_image_datasets(dataclasses.replace(cfg, val_split=val_split))
        in_channels, size = 3, cfg.image_size
        mean, std = IMAGENET_MEAN, IMAGENET_STD
    classes = list(train.classes)
    num_classes = len(classes)
    for name, ds in (("train", train), ("val", val)):
        if len(ds) == 0:
            raise DataError(f"the {name} split is empty: check data.data_path and data.{name}_split")
        bad = [y for y in set(ds.targets) if not 0 <= y < num_classes]
        if bad:
            raise DataError(
                f"{name} split has label {max(bad)} but only {num_classes} classes (labels must be 0..{num_classes - 1})"
            )
    base = list(range(len(train)))
    if cfg.long_tail_ratio > 1:
        base = long_tail_indices(train.targets, num_classes, cfg.long_tail_ratio, seed=0)
    if cfg.holdout > 0:  # val: the held-out training images (through the val transforms)
        kept, held = holdout_split([train.targets[i] for i in base], num_classes, cfg.holdout)
        train, val = SubsetWithTargets(train, [base[i] for i in kept]), SubsetWithTargets(val, [base[i] for i in held])
    elif cfg.long_tail_ratio > 1:
        train = SubsetWithTargets(train, base)
    mean = list(cfg.mean) if cfg.mean is not None else list(mean)
    std = list(cfg.std) if cfg.std is not None else list(std)
    for key, values in (("data.mean", mean), ("data.std", std)):
        if len(values) not in (1, in_channels):
            want = "1 value" if in_channels == 1 else f"{in_channels} values (or 1 for all)"
            raise DataError(f"config key '{key}': {len(values)} values, but {cfg.dataset} images have {in_channels} "
                            f"channel{'s' if in_channels > 1 else ''}: give {want}")
    mean, std = (mean * in_channels if len(mean) == 1 else mean), (std * in_channels if len(std) == 1 else std)
    return train, val, DataInfo(num_classes, in_channels, classes, mean, std, size)
