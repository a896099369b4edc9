"""Crop geometry: the box and flip a seeded training crop used, read from the training transform itself."""

from __future__ import annotations

import copy
from typing import Any, Callable, Optional

import torch
from torch import Tensor
from torch.utils.data import Dataset

from wsld.data.transforms import PadCropFlip, TrainTransform
from wsld.errors import DataError

CropParams = tuple[int, int, int, int, int]  # top, left, height, width, flip


def base_dataset(dataset: Dataset) -> tuple[Dataset, Callable[[int], int]]:
    """The dataset holding the transform, and the map from our index to its index (long-tail subsets)."""
    from wsld.data.build import SubsetWithTargets

    if isinstance(dataset, SubsetWithTargets):
        inner, to_inner = base_dataset(dataset.dataset)
        return inner, lambda i: to_inner(dataset.indices[i])
    return dataset, lambda i: i


def tensor_transform_params(transform: Callable, shape: tuple[int, ...]) -> CropParams:
    """Box and flip of a crop+flip transform on (C, H, W) tensors, read by running it on an image
    whose pixels hold their own coordinates (row + 1, column + 1; padding reads as 0)."""
    h0, w0 = int(shape[-2]), int(shape[-1])
    rows = torch.arange(1, h0 + 1, dtype=torch.int32).view(h0, 1).expand(h0, w0)
    cols = torch.arange(1, w0 + 1, dtype=torch.int32).view(1, w0).expand(h0, w0)
    out = transform(torch.stack([rows, cols]).contiguous())
    h, w = int(out.shape[-2]), int(out.shape[-1])
    valid = (out[0] > 0).nonzero()
    if len(valid) == 0:
        raise DataError("cannot read the crop box: the crop holds no pixel of the image (padding >= image size?)")
    r, c = int(valid[0, 0]), int(valid[0, 1])
    flip = 0
    row_cols = out[1, r][out[1, r] > 0]
    if len(row_cols) >= 2 and int(row_cols[1]) < int(row_cols[0]):
        flip = 1
    src_r, src_c = int(out[0, r, c]) - 1, int(out[1, r, c]) - 1
    crop_c = (w - 1 - c) if flip else c
    return src_r - r, src_c - crop_c, h, w, flip


def photo_transform_params(transform: TrainTransform, img: Any, seed: int) -> CropParams:
    """Box and flip of ``TrainTransform`` under ``seed``: its own ``crop_box`` draw (RandomResizedCrop,
    then the flip) or, for ``crop="padded"``, its ``PadCropFlip`` draw from the generator it seeds
    with ``seed``; ``tests/test_soft_labels.py`` checks both against the transform's output."""
    if transform.crop == "padded":
        # the box is in the coordinates of the Resize + CenterCrop view, offset by the padding
        top, left, flip = transform.pad_crop.params(torch.Generator().manual_seed(int(seed)))
        p, size = transform.padding, transform.size
        return top - p, left - p, int(size), int(size), int(flip)
    top, left, h, w, flip = transform.crop_box(img.width, img.height, seed)
    return int(top), int(left), int(h), int(w), int(flip)


class RecordingTransform:
    """Runs the real transform; first reads its box and flip from the same random numbers.

    Photo transforms ``t(img, seed)`` and the built-in ``PadCropFlip`` ``t(img, generator)`` draw
    from their own per-sample generator; a plain tensor transform ``t(img)`` draws from torch's
    global RNG, seeded by the caller.
    """

    def __init__(self, inner: Callable):
        self.inner = inner
        self.last: Optional[CropParams] = None

    def __call__(self, img, *seed):
        if isinstance(self.inner, TrainTransform) and seed and seed[0] is not None:
            self.last = photo_transform_params(self.inner, img, seed[0])
        elif isinstance(self.inner, PadCropFlip) and seed and isinstance(seed[0], torch.Generator):
            g = seed[0]  # built-in data: the transform draws from this per-sample generator
            state = g.get_state()
            top, left, flip = self.inner.params(g)
            g.set_state(state)
            p = self.inner.pad
            self.last = (top - p, left - p, int(img.shape[-2]), int(img.shape[-1]), int(flip))
        elif isinstance(img, Tensor) and not seed:
            state = torch.get_rng_state()
            self.last = tensor_transform_params(self.inner, tuple(img.shape))
            torch.set_rng_state(state)
        else:  # deterministic (val) transform: the whole image, unflipped
            self.last = (0, 0, int(img.height), int(img.width), 0) if hasattr(img, "height") else None
        return self.inner(img, *seed)


def is_sample(item: Any) -> bool:
    """``(image tensor, label)``, not a corrupt-sample marker (which is a named tuple of strings)."""
    return isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], Tensor)


class CropRecorder:
    """A view of a training dataset whose items also say which box and flip the crop used.

    Replay needs no geometry of its own: sample ``i`` is augmented under the seed
    ``sample_seed(seed, epoch, i)``, so the same transform under the same seed gives the same
    pixels; the box and flip are stored so that the replay can be checked against them.
    """

    def __init__(self, dataset: Dataset):
        base, self.to_base = base_dataset(dataset)
        self.base = copy.copy(base)  # the caller's dataset keeps its own transform
        inner = getattr(base, "transform", None)
        self.recorder = RecordingTransform(inner) if inner is not None else None
        if self.recorder is not None:
            self.base.transform = self.recorder

    def __call__(self, index: int, seed: int) -> tuple[Any, Optional[CropParams]]:
        """``(item, (top, left, height, width, flip))``; item is what the dataset returns."""
        if self.recorder is not None:
            self.recorder.last = None
        item = self.base[(self.to_base(index), seed)]
        params = self.recorder.last if self.recorder is not None else None
        if params is None and is_sample(item):
            params = (0, 0, int(item[0].shape[-2]), int(item[0].shape[-1]), 0)  # no augmentation
        return item, params


def crop_params(dataset: Dataset, index: int, seed: int) -> CropParams:
    """``(top, left, height, width, flip)`` of the training crop of ``index`` under ``seed``."""
    item, params = CropRecorder(dataset)(index, seed)
    if params is None or not is_sample(item):
        raise DataError(f"cannot read sample {index}: {getattr(item, 'error', item)}")
    return params
