"""Built-in datasets held in memory: Fashion-MNIST (Debian's package), scikit-learn's digits, and
CIFAR-10/100 from their downloaded files (``wsld.data.cifar``)."""

from __future__ import annotations

import gzip
import os
import struct
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from wsld.data.sampling import split_key
from wsld.data.transforms import PadCropFlip
from wsld.errors import DataError

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]  # fmt: skip
FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "val": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
GET_FASHION_MNIST = (
    "Fashion-MNIST files not found in {where}: install them with "
    "'apt-get install -y dataset-fashion-mnist' (Debian/Ubuntu), or set data.data_path to a folder "
    "holding train-images-idx3-ubyte(.gz) and the other three IDX files"
)


class TensorImageDataset(Dataset):
    """In-memory uint8 images (N, C, H, W) with integer labels; keys may carry an augmentation seed.

    ``transform(img, generator)`` draws its random numbers from a generator seeded with the key's seed.
    """

    def __init__(self, images: Tensor, targets: list[int], classes: list[str], transform: Optional[Callable] = None):
        self.images = images
        self.targets = list(targets)
        self.classes = list(classes)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, key):
        index, seed = split_key(key)
        img = self.images[index]
        if self.transform is not None:
            g = torch.Generator().manual_seed(seed if seed is not None else int(torch.randint(0, 2**62, (1,)).item()))
            img = self.transform(img, g)
        return img, self.targets[index]

    def describe(self, index: int) -> str:
        return f"sample {index}"


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (optionally gzipped): big-endian magic, dims, then uint8 data."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as e:
        raise DataError(f"cannot read IDX file {path}: {e}") from None
    if len(data) < 4:
        raise DataError(f"IDX file {path} is truncated")
    zero, dtype_code, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype_code != 0x08:
        raise DataError(f"{path} is not a uint8 IDX file (bad magic number)")
    dims = struct.unpack(">" + "I" * ndim, data[4 : 4 + 4 * ndim])
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(dims)):
        raise DataError(f"IDX file {path} is truncated: expected {int(np.prod(dims))} values, found {body.size}")
    return body.reshape(dims)


def _find_idx(folder: Path, stem: str) -> Optional[Path]:
    for cand in (folder / stem, folder / f"{stem}.gz", folder / "FashionMNIST" / "raw" / stem,
                 folder / "FashionMNIST" / "raw" / f"{stem}.gz", folder / "raw" / stem, folder / "raw" / f"{stem}.gz"):
        if cand.is_file():
            return cand
    return None


def load_fashion_mnist(split: str, data_path: Optional[str] = None) -> tuple[Tensor, list[int]]:
    folder = Path(os.path.expanduser(data_path or FASHION_MNIST_DIR))
    if split not in FASHION_MNIST_FILES:
        raise DataError(f"fashion-mnist has splits 'train' and 'val' (the 10,000 test images), not '{split}'")
    img_stem, lbl_stem = FASHION_MNIST_FILES[split]
    img_path, lbl_path = _find_idx(folder, img_stem), _find_idx(folder, lbl_stem)
    if img_path is None or lbl_path is None:
        raise DataError(GET_FASHION_MNIST.format(where=folder))
    images = read_idx(img_path)
    labels = read_idx(lbl_path)
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise DataError(f"Fashion-MNIST files in {folder} do not match (images {images.shape}, labels {labels.shape})")
    return torch.from_numpy(images.copy()).unsqueeze(1), labels.astype(np.int64).tolist()


def load_digits_split(split: str) -> tuple[Tensor, list[int]]:
    """scikit-learn's 1,797 8x8 digits, 16 grey levels scaled to 0..255, fixed stratified 75/25 split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    if split not in ("train", "val"):
        raise DataError(f"digits has splits 'train' and 'val', not '{split}'")
    d = load_digits()
    images = np.clip(d.images * 16.0, 0, 255).round().astype(np.uint8)
    idx = np.arange(len(images))
    tr, va = train_test_split(idx, test_size=0.25, random_state=0, stratify=d.target)
    sel = np.sort(tr if split == "train" else va)
    return torch.from_numpy(images[sel]).unsqueeze(1), d.target[sel].astype(np.int64).tolist()


def _cifar_loader(name: str) -> Callable[..., tuple[Tensor, list[int], list[str]]]:
    def load(split: str, data_path: Optional[str] = None) -> tuple[Tensor, list[int], list[str]]:
        from wsld.data.cifar import load_cifar

        images, targets, classes = load_cifar(name, split, data_path)
        return torch.from_numpy(images), targets, classes

    return load


# name -> (loader, classes, mean, std, crop padding, horizontal flip is label-preserving). A loader
# returns (images, targets) or, where the files name the classes (CIFAR), (images, targets, classes).
# CIFAR: the CRD benchmark's augmentation (random 32 crop of the 4-pixel zero-padded image + flip)
# and the training sets' per-channel statistics (CIFAR-100's as the benchmark's spec gives them).
BUILTIN_DATASETS: dict[str, dict] = {
    "fashion-mnist": dict(
        load=load_fashion_mnist, classes=FASHION_MNIST_CLASSES, mean=[0.2860], std=[0.3530], pad=2, flip=True
    ),
    "digits": dict(
        load=lambda split, data_path=None: load_digits_split(split),
        classes=[str(i) for i in range(10)], mean=[0.3053], std=[0.3755], pad=1, flip=False,
    ),
    "cifar10": dict(
        load=_cifar_loader("cifar10"), classes=None, mean=[0.4914, 0.4822, 0.4465], std=[0.2470, 0.2435, 0.2616],
        pad=4, flip=True,
    ),
    "cifar100": dict(
        load=_cifar_loader("cifar100"), classes=None, mean=[0.5071, 0.4865, 0.4409], std=[0.2673, 0.2564, 0.2762],
        pad=4, flip=True,
    ),
}


def _has_images(folder: Path, limit: int = 50) -> bool:
    """Whether ``folder`` directly holds an image file (looking at ``limit`` entries at most)."""
    from wsld.data.images import is_image_name

    try:
        with os.scandir(folder) as it:
            for n, entry in enumerate(it):
                if n >= limit:
                    return False
                if is_image_name(entry.name) and entry.is_file():
                    return True
    except OSError:
        return False
    return False


def photo_tree_layout(root: Path) -> Optional[str]:
    """``split`` for ROOT/<split>/<class>/<images>, ``classes`` for ROOT/<class>/<images>, else None."""
    if not root.is_dir():
        return None
    try:
        subs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))[:20]
    except OSError:
        return None
    for sub in subs:
        if any(c.is_dir() and _has_images(c) for c in sorted(sub.iterdir())[:20] if not c.name.startswith(".")):
            return "split"
    return "classes" if any(_has_images(sub) for sub in subs) else None


def refuse_photo_tree(name: str, data_path: Optional[str]) -> None:
    """A folder of photos in class folders given to a built-in dataset: one line with the command for photos."""
    if not data_path:
        return
    root = Path(os.path.expanduser(data_path))
    layout = photo_tree_layout(root)
    if layout is None:
        return
    cmd = f"wsld train configs/own_photos_small.yaml data.data_path={root}"
    how = (f"train on them with: {cmd} (or add data.format=folder data.dataset=NAME to your config)" if layout == "split"
           else f"put them in {root}/train/<class>/ and {root}/val/<class>/, then: {cmd}")
    raise DataError(f"data.data_path={root} holds photos in class folders, but data.dataset={name} is a built-in "
                    f"dataset (data.format=builtin) that reads its own files; {how}")


def build_builtin(name: str, split: str, data_path: Optional[str], train: bool, augment: bool, hflip: bool):
    spec = BUILTIN_DATASETS[name]
    refuse_photo_tree(name, data_path)
    loaded = spec["load"](split, data_path=data_path)
    images, targets = loaded[0], loaded[1]
    classes = loaded[2] if len(loaded) > 2 else spec["classes"]
    transform = PadCropFlip(spec["pad"], hflip and spec["flip"]) if train and augment else None
    return TensorImageDataset(images, targets, classes, transform), spec
