"""Datasets: built-in arrays, image folders, list files and LMDBs behind one interface.

Every dataset is map-style, takes keys ``index`` or ``(index, seed)`` (see ``sampling``), returns
``(uint8 CHW tensor, label)`` and has ``targets`` (one label per index) and ``classes``.
Normalisation happens on the device (``DataInfo.mean/std``), so loaders move uint8.

This package's ``__init__`` holds only what needs no torch (the ImageNet statistics, ``DataInfo``):
``wsld data list | pack | verify`` import ``wsld.data.lists/pack/verify`` and must start without torch.
``build_datasets`` and ``SubsetWithTargets`` live in ``wsld.data.build``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]


@dataclass
class DataInfo:
    num_classes: int
    in_channels: int
    classes: list[str]
    mean: list[float]
    std: list[float]
    image_size: int
    # set by the trainer: the data's identity (wsld.data.identity), and whether what was made from
    # other data (a resumed checkpoint, a soft-label store) is accepted (--allow-data-change)
    identity: Optional[dict] = None
    allow_data_change: bool = False
