"""Photo datasets over three sources (image folder, list file, LMDB) behind one interface.

Every dataset here is map-style: ``ds[i]`` or ``ds[(i, seed)]`` returns ``(uint8 CHW RGB tensor,
label)``; with a seed, the random augmentation draws from a generator seeded with it (the same
numbers ``seeded_rng(seed)`` would give torchvision's transforms), so a sample's crop is a pure
function of the seed whatever the source, worker or process. ``targets`` and ``classes`` are known without
decoding any image, and ``describe(i)`` names the file for messages.

A sample that cannot be read or decoded returns ``CorruptSample(path, error)`` instead of a
tuple when ``on_corrupt="skip"`` (``collate_skip_corrupt`` drops it from the batch and hands it to
the caller to log and count); with ``on_corrupt="stop"`` it raises ``DataError`` naming the file.
A bad image is never replaced by another sample, which would pair an image with a wrong label.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Callable, NamedTuple, Union

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from wsld.data.files import read_image_file, real_root
from wsld.data.images import EncodedImage, ImageDecodeError
from wsld.data.lists import CLASSES_FILE, LIST_SUFFIX, read_list, scan_dataset
from wsld.data.lmdb_reader import (
    LmdbIndex,
    LmdbReader,
    RecordError,
    folder_order_mismatch,
    is_lmdb_dir,
    join_stored_labels,
    open_lmdb_index,
)
from wsld.data.sampling import split_key
from wsld.data.strtable import StringTable
from wsld.data.transforms import TrainTransform, ValTransform
from wsld.errors import DataError

REFERENCE_LABEL_MODES = ("folders", "stored")


class CorruptSample(NamedTuple):
    """Returned instead of ``(image, label)`` for an unusable image when ``on_corrupt="skip"``."""

    path: str
    error: str


def collate_skip_corrupt(batch: list) -> tuple[Tensor, Tensor, list[CorruptSample]]:
    """Stack the good samples, set the ``CorruptSample`` markers aside: ``(images, labels, corrupt)``.

    Works for any dataset whose samples are ``(tensor, int)``. A batch of only corrupt samples
    gives empty ``(0, 0, 0, 0)`` images and ``(0,)`` labels: the caller skips such a batch.
    """
    good, bad = [], []
    for item in batch:
        (bad if isinstance(item, CorruptSample) else good).append(item)
    if not good:
        return torch.empty((0, 0, 0, 0), dtype=torch.uint8), torch.empty((0,), dtype=torch.int64), bad
    images = torch.stack([g[0] for g in good])
    labels = torch.tensor([int(g[1]) for g in good], dtype=torch.int64)
    return images, labels, bad


class FileSource:
    """Images as files under ``split_dir`` (folder and list formats), read only if they are regular
    files inside the dataset root ``split_dir/..`` (else ``UnsafeFileError``, a corrupt sample)."""

    def __init__(self, split_dir: Path, paths: list[str], labels: list[int], classes: list[str]):
        self.split_dir = Path(split_dir)
        self.root = real_root(self.split_dir.parent)
        self.paths = StringTable(paths)
        self.labels = np.asarray(labels, dtype=np.int64)
        self.classes = list(classes)

    def __len__(self) -> int:
        return len(self.paths)

    def read(self, i: int) -> bytes:
        return read_image_file(self.split_dir / self.paths[i], self.root)

    def describe(self, i: int) -> str:
        return str(self.split_dir / self.paths[i])


class LmdbSource:
    """Images as LMDB records (wsld or reference format); the LMDB opens lazily per worker process."""

    def __init__(self, index: LmdbIndex):
        self.reader = LmdbReader(index)
        self.labels = index.labels
        self.classes = list(index.classes)

    def __len__(self) -> int:
        return len(self.labels)

    def read(self, i: int) -> bytes:
        return self.reader.read(i)[0]

    def describe(self, i: int) -> str:
        return self.reader.describe(i)


Source = Union[FileSource, LmdbSource]


class PhotoDataset(Dataset):
    """A source plus a transform; see the module doc for the protocol."""

    def __init__(self, source: Source, transform: Callable, on_corrupt: str = "skip"):
        if on_corrupt not in ("skip", "stop"):
            raise DataError(f"config key 'data.on_corrupt': '{on_corrupt}' is not one of skip, stop")
        self.source = source
        self.transform = transform
        self.on_corrupt = on_corrupt
        self.classes = list(source.classes)
        self.targets = source.labels.tolist()

    def __len__(self) -> int:
        return len(self.source)

    def describe(self, index: int) -> str:
        return self.source.describe(index)

    def __getitem__(self, key):
        index, seed = split_key(key)
        if not 0 <= index < len(self.source):
            raise IndexError(f"index {index} out of range for {len(self.source)} samples")
        try:
            img = EncodedImage(self.source.read(index))
            tensor = self.transform(img, seed)  # draws from a generator seeded with `seed` (see transforms)
        except (ImageDecodeError, RecordError, OSError, ValueError, SyntaxError, EOFError) as e:
            # OSError: the file could not be read; the others: Pillow quirks on damaged data
            reason = f"cannot read: {e.strerror or e}" if isinstance(e, OSError) and e.strerror else str(e)
            if self.on_corrupt == "stop":
                raise DataError(f"corrupt image {self.describe(index)}: {reason} (data.on_corrupt=skip skips it)") from None
            return CorruptSample(self.describe(index), reason)
        return tensor, int(self.source.labels[index])


def _transforms(cfg) -> tuple[Callable, Callable]:
    val = ValTransform(cfg.image_size, cfg.val_resize, fast_decode=cfg.fast_decode)
    if not cfg.augment:
        return val, val
    train = TrainTransform(cfg.image_size, cfg.min_scale, cfg.hflip, cfg.color_jitter, fast_decode=cfg.fast_decode,
                           crop=getattr(cfg, "train_crop", "resized"), padding=getattr(cfg, "crop_padding", 4))
    return train, val


def _check_config(cfg) -> None:
    if not 0 < cfg.min_scale <= 1:
        raise DataError(f"config key 'data.min_scale': must be in (0, 1], got {cfg.min_scale}")
    if cfg.val_resize < 1:
        raise DataError(f"config key 'data.val_resize': must be >= 1, got {cfg.val_resize}")
    if cfg.color_jitter < 0:
        raise DataError(f"config key 'data.color_jitter': must be >= 0, got {cfg.color_jitter}")
    mode = getattr(cfg, "reference_labels", "folders")
    if mode not in REFERENCE_LABEL_MODES:
        raise DataError(f"config key 'data.reference_labels': '{mode}' is not one of {', '.join(REFERENCE_LABEL_MODES)}")


def lmdb_split_path(root: Path, split: str) -> Path:
    """``data_path/<split>``; a hint names ``wsld data pack`` when it is not there."""
    path = root / split
    if not is_lmdb_dir(path):
        if is_lmdb_dir(root / "lmdb" / split):
            raise DataError(f"no LMDB at {path}, but {root / 'lmdb' / split} is one: set data.data_path={root / 'lmdb'}")
        raise DataError(
            f"no LMDB at {path}: pack it with 'wsld data pack ROOT --split {split}' (written to ROOT/lmdb/{split}) "
            "and set data.data_path to ROOT/lmdb"
        )
    return path


def _warn(msg: str) -> None:
    print(f"[wsld] warning: {msg}", file=sys.stderr, flush=True)


def _warn_reference(index: LmdbIndex) -> None:
    """Say what reading a reference-tool LMDB changes: repeated datalist lines dropped, labels
    taken from the sorted folders instead of the stored ones."""
    if index.kind != "reference":
        return
    for note in index.notes:
        _warn(note)
    if index.stored_labels is not None:
        return
    n, differ = folder_order_mismatch(index)
    if differ:
        folder, stored, label = differ[0]
        _warn(
            f"{index.path}: {n} of {len(index)} samples ({len(differ)} of {len(index.classes)} class folders, e.g. "
            f"'{folder}' stored as {stored}, sorted order {label}) are stored with another label than the sorted "
            "class-folder order wsld trains with (torchvision's pretrained teachers' order); set "
            "data.reference_labels=stored to keep the stored labels"
        )


def build_sources(cfg) -> tuple[Source, Source]:
    """Train and val sources for ``data.format`` folder | list | lmdb."""
    if not cfg.data_path:
        raise DataError(f"config key 'data.data_path': required for data.format={cfg.format} (the dataset root)")
    root = Path(os.path.expanduser(str(cfg.data_path)))
    if not root.is_dir():
        raise DataError(f"config key 'data.data_path': folder not found: {root}")
    splits = (cfg.train_split, cfg.val_split)
    if cfg.format == "folder":
        lists = scan_dataset(root, list(dict.fromkeys(splits)))
        tr, va = lists[cfg.train_split], lists[cfg.val_split]
        return (FileSource(tr.split_dir, tr.paths, tr.labels, tr.classes),
                FileSource(va.split_dir, va.paths, va.labels, va.classes))
    if cfg.format == "list":
        out = []
        for split in splits:
            lst = read_list(root / f"{split}{LIST_SUFFIX}", root / CLASSES_FILE)
            out.append(FileSource(lst.split_dir, lst.paths, lst.labels, lst.classes))
        return out[0], out[1]
    if cfg.format == "lmdb":
        mode = getattr(cfg, "reference_labels", "folders")
        idx = [open_lmdb_index(lmdb_split_path(root, s), require_complete=True, reference_labels=mode) for s in splits]
        for index in {i.path: i for i in idx}.values():  # the same LMDB for train and val is reported once
            _warn_reference(index)
        if all(i.kind == "reference" and i.stored_labels is not None for i in idx):
            idx[0].classes = idx[1].classes = join_stored_labels(idx[0], idx[1])
        if idx[0].classes != idx[1].classes:
            only = sorted(set(idx[0].classes) ^ set(idx[1].classes))
            which = f"class '{only[0]}' is in only one of them" if only else "the same classes in another order"
            raise DataError(
                f"LMDBs {idx[0].path} and {idx[1].path} have different class lists "
                f"({len(idx[0].classes)} vs {len(idx[1].classes)} classes; {which}): pack both from the same "
                "dataset root"
            )
        return LmdbSource(idx[0]), LmdbSource(idx[1])
    raise DataError(f"config key 'data.format': '{cfg.format}' is not one of folder, list, lmdb")


def build_image_datasets(cfg) -> tuple[PhotoDataset, PhotoDataset]:
    """``(train, val)`` photo datasets for a ``DataConfig`` with format folder | list | lmdb."""
    _check_config(cfg)
    train_src, val_src = build_sources(cfg)
    train_tf, val_tf = _transforms(cfg)
    return PhotoDataset(train_src, train_tf, cfg.on_corrupt), PhotoDataset(val_src, val_tf, cfg.on_corrupt)

