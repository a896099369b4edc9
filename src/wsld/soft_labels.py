"""Offline teacher soft labels with crop replay (Fast Knowledge Distillation, Shen & Xing, ECCV 2022).

The teacher forward is paid once: ``wsld soft-labels`` draws K training crops of every image
with the training augmentation's own seeds, runs the teacher on them and stores, per crop, the
crop box, the flip bit and the teacher's top-k outputs. Training with
``distill.soft_labels=PATH`` replays exactly those crops (epoch ``e`` uses crop ``e mod K``) and
rebuilds the teacher's logits from the store, so no teacher model is built.

Crop replay needs no geometry code of its own: the training augmentation of sample ``i`` runs
under the seed ``sample_seed(seed, epoch, i)`` (``data.sampling``). Crop ``k`` of image ``i`` is
generated with the seed ``sample_seed(seed, k, i)`` and, in training, epoch ``e`` asks the
dataset for image ``i`` with the seed ``sample_seed(seed, e mod K, i)``: the same transform under
the same seed gives the same pixels. The box and flip bit are stored too, read from the
transform under that seed, so the replay can be checked against them.

Store (one LMDB directory):

- ``__wsld_soft_labels_meta__``: JSON (format, crops K, topk k, precision, classes, count, teacher
  and the SHA-256 of its weights, seed, the data keys that shape a crop, the SHA-256 of the
  labels), written first; ``__wsld_soft_labels_complete__``: JSON ``{"count": n}``, written last.
  Without it the store is incomplete and training refuses it.
- 8-byte big-endian image index -> K packed records (``record_dtype``): ``box``
  (top, left, height, width in source-image pixels; negative = padding), ``flip``,
  ``class_index`` (top-k classes, most probable first), ``log_prob`` (the teacher's top-k
  log-probabilities at T = 1, float16 by default), ``lse`` (log-sum-exp of all logits, float32),
  ``true_logit`` (the teacher's logit of the labelled class, float32), ``tail_lse`` (log-sum-exp of
  the logits of the classes neither in the top-k nor labelled, float32; -inf if none). An image
  that could not be read when the store was made has an empty value.

How the teacher's logits are rebuilt (``teacher_logits_from_stored``): logits are only defined up
to a constant ``lse``. The labelled class gets its exact logit; the ``n`` unstored classes share
their exact total probability ``exp(tail_lse - lse)`` equally; the other stored classes share
what is left (exactly), split by their stored log-probabilities. Hence at T = 1 the log-sum-exp,
the true class's probability, ``CE_teacher(y) = lse - z_t[y]`` (the WSLD weight) and the tail's
total mass are exact whatever k; with k = C and float32 every logit is exact. What k < C
approximates is only how the tail mass is split among the unstored classes, which changes the
tempered soft label at T != 1 (docs/soft_labels.md measures the effect).
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import os
import struct
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from wsld.data.sampling import ResumableSampler, sample_seed
from wsld.errors import DataError, UserError

FORMAT = "wsld-soft-labels"
FORMAT_VERSION = 1
META_KEY, COMPLETE_KEY = b"__wsld_soft_labels_meta__", b"__wsld_soft_labels_complete__"  # never 8 bytes long
PRECISIONS = {"float16": "<f2", "float32": "<f4"}
# data keys that decide which pixels a seeded training crop holds
CROP_DATA_KEYS = (
    "dataset", "format", "train_split", "image_size", "min_scale", "hflip", "augment", "color_jitter",
    "fast_decode", "long_tail_ratio", "train_crop", "crop_padding", "val_resize",
)  # fmt: skip
# meta keys that must agree between a store and the run that resumes writing it
IDENTITY_KEYS = ("format", "version", "crops", "topk", "precision", "classes", "count", "teacher",
                 "teacher_sha256", "seed", "data", "targets_sha256")  # fmt: skip
FINISH_HINT = "run 'wsld soft-labels' again with the same arguments to finish it"


# --------------------------------------------------------------------------- records


def record_dtype(topk: int, num_classes: int, precision: str = "float16") -> np.dtype:
    """Packed record of one crop (see the module doc)."""
    index_type = "<u2" if num_classes <= 65535 else "<i4"
    return np.dtype([
        ("box", "<i4", (4,)), ("flip", "u1"), ("class_index", index_type, (topk,)),
        ("log_prob", PRECISIONS[precision], (topk,)), ("lse", "<f4"), ("true_logit", "<f4"), ("tail_lse", "<f4"),
    ])  # fmt: skip


def image_key(index: int) -> bytes:
    return struct.pack(">Q", index)


def teacher_logits_from_stored(
    log_prob: Tensor, class_index: Tensor, lse: Tensor, true_logit: Tensor, tail_lse: Tensor, target: Tensor,
    num_classes: int,
) -> Tensor:
    """Full (N, C) teacher logits rebuilt from stored top-k values (float32; see the module doc).

    ``log_prob``/``class_index``: (N, k) top-k log-probabilities at T = 1 and their classes;
    ``lse``: (N,) log-sum-exp of all C logits; ``true_logit``: (N,) the logit of ``target``;
    ``tail_lse``: (N,) log-sum-exp of the logits of the classes neither in the top-k nor ``target``
    (-inf when there are none).
    """
    n, c = log_prob.shape[0], num_classes
    dev = log_prob.device
    rows = torch.arange(n, device=dev)
    idx = class_index.long()
    lse = lse.float()
    lp_y = true_logit.float() - lse  # exact: the WSLD weight needs CE_teacher(y)
    tail = (tail_lse.float() - lse).clamp_max(0.0)  # exact log of the unstored classes' total mass
    # stored classes other than the target share the mass left, exactly: their float16 log-probs
    # only set the split among them (a common shift absorbs the rounding)
    others = idx != target[:, None]
    lp_top = log_prob.float().masked_fill(~others, float("-inf"))
    left = (1.0 - lp_y.exp() - tail.exp()).clamp_min(1e-30)
    shift = torch.where(others.any(dim=1), left.log() - torch.logsumexp(lp_top, dim=1), torch.zeros_like(left))
    known = torch.zeros(n, c, device=dev, dtype=torch.bool).scatter_(1, idx, True)
    known[rows, target] = True
    n_rest = c - known.sum(dim=1)
    lp = (tail - torch.log(n_rest.clamp_min(1).float()))[:, None].expand(n, c).clone()  # unstored: equal split
    lp.scatter_(1, idx, log_prob.float() + shift[:, None])
    lp[rows, target] = lp_y
    return lp + lse[:, None]


def records_from_logits(logits: Tensor, target: Tensor, topk: int, precision: str = "float16") -> np.ndarray:
    """The stored form of teacher logits (N, C) for labels ``target`` (``box``/``flip`` left 0)."""
    logits = logits.detach().float()
    lse = torch.logsumexp(logits, dim=1)
    top_val, top_idx = logits.topk(topk, dim=1)
    unstored = logits.scatter(1, top_idx, float("-inf")).scatter(1, target[:, None], float("-inf"))
    rec = np.zeros(len(logits), dtype=record_dtype(topk, logits.shape[1], precision))
    rec["class_index"] = top_idx.cpu().numpy()
    rec["log_prob"] = (top_val - lse[:, None]).clamp_min(-6e4).cpu().numpy()  # finite in float16
    rec["lse"] = lse.cpu().numpy()
    rec["true_logit"] = logits.gather(1, target[:, None])[:, 0].cpu().numpy()
    rec["tail_lse"] = torch.logsumexp(unstored, dim=1).cpu().numpy()
    return rec


def records_to_tensors(records: np.ndarray) -> dict[str, Tensor]:
    """Structured records (N,) -> the tensors ``teacher_logits_from_stored`` takes."""
    return {
        "log_prob": torch.from_numpy(np.ascontiguousarray(records["log_prob"])),
        "class_index": torch.from_numpy(records["class_index"].astype(np.int64)),
        "lse": torch.from_numpy(np.ascontiguousarray(records["lse"])),
        "true_logit": torch.from_numpy(np.ascontiguousarray(records["true_logit"])),
        "tail_lse": torch.from_numpy(np.ascontiguousarray(records["tail_lse"])),
        "box": torch.from_numpy(records["box"].astype(np.int64)),
        "flip": torch.from_numpy(records["flip"].astype(np.bool_)),
    }


# --------------------------------------------------------------------------- crop geometry


def _base_dataset(dataset: Dataset) -> tuple[Dataset, Callable[[int], int]]:
    """The dataset holding the transform, and the map from our index to its index (long-tail subsets)."""
    from wsld.data import SubsetWithTargets

    if isinstance(dataset, SubsetWithTargets):
        inner, to_inner = _base_dataset(dataset.dataset)
        return inner, lambda i: to_inner(dataset.indices[i])
    return dataset, lambda i: i


def _tensor_transform_params(transform: Callable, shape: tuple[int, ...]) -> tuple[int, int, int, int, int]:
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


def _photo_transform_params(transform: Any, img: Any, seed: Optional[int]) -> tuple[int, int, int, int, int]:
    """Box and flip of ``TrainTransform`` (RandomResizedCrop then flip), drawn from the generator it
    seeds with ``seed``, in its order; ``tests/test_soft_labels.py`` checks this against its output."""
    from wsld.data.transforms import _generator, random_resized_crop_params

    g = _generator(seed)
    if getattr(transform, "crop", "resized") == "padded":
        # padded crops: the box is in the coordinates of the Resize + CenterCrop view, offset by the padding
        top, left, flip = transform.pad_crop.params(g)
        p, size = transform.padding, transform.size
        return top - p, left - p, int(size), int(size), int(flip)
    top, left, h, w = random_resized_crop_params(img.width, img.height, transform.scale, g)
    flip = int(bool(transform.hflip) and torch.rand(1, generator=g).item() < 0.5)
    return int(top), int(left), int(h), int(w), flip


class _RecordingTransform:
    """Runs the real transform; first reads its box and flip from the same random numbers.

    Photo transforms ``t(img, seed)`` and the built-in ``PadCropFlip`` ``t(img, generator)`` draw
    from their own per-sample generator; a plain tensor transform ``t(img)`` draws from torch's
    global RNG, seeded by the caller.
    """

    def __init__(self, inner: Callable):
        self.inner = inner
        self.last: Optional[tuple[int, int, int, int, int]] = None

    def __call__(self, img, *seed):
        from wsld.data.transforms import TrainTransform

        from wsld.data.transforms import PadCropFlip

        if isinstance(self.inner, TrainTransform):
            self.last = _photo_transform_params(self.inner, img, seed[0] if seed else None)
        elif isinstance(self.inner, PadCropFlip) and seed and isinstance(seed[0], torch.Generator):
            g = seed[0]  # built-in data: the transform draws from this per-sample generator
            state = g.get_state()
            top, left, flip = self.inner.params(g)
            g.set_state(state)
            p = self.inner.pad
            self.last = (top - p, left - p, int(img.shape[-2]), int(img.shape[-1]), int(flip))
        elif isinstance(img, Tensor) and not seed:
            state = torch.get_rng_state()
            self.last = _tensor_transform_params(self.inner, tuple(img.shape))
            torch.set_rng_state(state)
        else:  # deterministic (val) transform: the whole image, unflipped
            self.last = (0, 0, int(img.height), int(img.width), 0) if hasattr(img, "height") else None
        return self.inner(img, *seed)


def _is_sample(item: Any) -> bool:
    """``(image tensor, label)``, not a corrupt-sample marker (which is a named tuple of strings)."""
    return isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], Tensor)


class CropRecorder:
    """A view of a training dataset whose items also say which box and flip the crop used."""

    def __init__(self, dataset: Dataset):
        base, self.to_base = _base_dataset(dataset)
        self.base = copy.copy(base)  # the caller's dataset keeps its own transform
        inner = getattr(base, "transform", None)
        self.recorder = _RecordingTransform(inner) if inner is not None else None
        if self.recorder is not None:
            self.base.transform = self.recorder

    def __call__(self, index: int, seed: int):
        """``(item, (top, left, height, width, flip))``; item is what the dataset returns."""
        if self.recorder is not None:
            self.recorder.last = None
        item = self.base[(self.to_base(index), seed)]
        params = self.recorder.last if self.recorder is not None else None
        if params is None and _is_sample(item):
            params = (0, 0, int(item[0].shape[-2]), int(item[0].shape[-1]), 0)  # no augmentation
        return item, params


def crop_params(dataset: Dataset, index: int, seed: int) -> tuple[int, int, int, int, int]:
    """``(top, left, height, width, flip)`` of the training crop of ``index`` under ``seed``."""
    item, params = CropRecorder(dataset)(index, seed)
    if params is None or not _is_sample(item):
        raise DataError(f"cannot read sample {index}: {getattr(item, 'error', item)}")
    return params


# --------------------------------------------------------------------------- the store


def _read_meta(env) -> tuple[Optional[dict], Optional[dict]]:
    with env.begin() as txn:
        meta, done = txn.get(META_KEY), txn.get(COMPLETE_KEY)
    return (json.loads(meta) if meta else None), (json.loads(done) if done else None)


def _image_count(env) -> int:
    """Image records: every key but the two metadata keys."""
    with env.begin() as txn:
        return int(txn.stat()["entries"]) - sum(1 for k in (META_KEY, COMPLETE_KEY) if txn.get(k) is not None)


class SoftLabelStore:
    """A finished soft-label store opened for reading; safe in DataLoader workers (opens per process)."""

    def __init__(self, path: str | Path):
        self.path = Path(os.path.expanduser(str(path)))
        if not (self.path / "data.mdb").is_file():
            raise DataError(f"distill.soft_labels: no soft-label store at {self.path} (make one with 'wsld soft-labels')")
        from wsld.data.lmdb_reader import shared_env

        env = shared_env(self.path)  # this process's read-only handle (DataLoader workers open their own)
        meta, done = _read_meta(env)
        n_done = _image_count(env) if meta is not None else 0
        if meta is None or meta.get("format") != FORMAT:
            raise DataError(f"distill.soft_labels: {self.path} is an LMDB but not a wsld soft-label store")
        if meta.get("version") != FORMAT_VERSION:
            raise DataError(f"distill.soft_labels: {self.path} has store version {meta.get('version')}, this wsld reads {FORMAT_VERSION}")
        if done is None:
            raise DataError(
                f"distill.soft_labels: {self.path} is incomplete ({n_done} of {meta['count']} images done): {FINISH_HINT}"
            )
        self.meta = meta
        self.crops, self.topk = int(meta["crops"]), int(meta["topk"])
        self.dtype = record_dtype(self.topk, len(meta["classes"]), meta["precision"])
        if meta.get("record_bytes") != self.dtype.itemsize:
            raise DataError(f"distill.soft_labels: {self.path} holds records of another layout (made by another wsld version): remake it")

    def records(self, index: int) -> np.ndarray:
        """The K records of image ``index`` (empty if it was unreadable when the store was made)."""
        from wsld.data.lmdb_reader import shared_env

        with shared_env(self.path).begin(buffers=False) as txn:
            value = txn.get(image_key(index))
        if value is None:
            raise DataError(f"soft-label store {self.path} has no record of image {index}: it does not belong to this data")
        return np.frombuffer(value, dtype=self.dtype)

    def record(self, index: int, crop: int) -> np.ndarray:
        recs = self.records(index)
        if len(recs) == 0:
            raise DataError(
                f"image {index} could not be read when {self.path} was made, but reads now: remake the soft labels"
            )
        return recs[crop : crop + 1]

    def check_data(self, cfg, train_ds: Dataset) -> None:
        """Refuse a store made from other data or another crop pipeline, with the keys that differ."""
        meta = self.meta
        classes = list(train_ds.classes)  # type: ignore[attr-defined]
        if meta["classes"] != classes:
            raise UserError(
                f"distill.soft_labels: {self.path} was made for other classes ({len(meta['classes'])}, first "
                f"{meta['classes'][:1]}) than this data's ({len(classes)}, first {classes[:1]})"
            )
        if meta["count"] != len(train_ds):  # type: ignore[arg-type]
            raise UserError(
                f"distill.soft_labels: {self.path} holds {meta['count']} images, the training split has {len(train_ds)}"  # type: ignore[arg-type]
            )
        if meta["targets_sha256"] != targets_sha256(train_ds):
            raise UserError(f"distill.soft_labels: {self.path} was made for other labels than this training split")
        now = crop_data_config(cfg)
        diff = [k for k in now if meta["data"].get(k) != now[k]]
        if diff:
            was = ", ".join(f"data.{k}={meta['data'].get(k)}" for k in diff)
            raise UserError(f"distill.soft_labels: {self.path} was made with {was}: use the same values or remake it")


def crop_data_config(cfg) -> dict[str, Any]:
    return {k: getattr(cfg.data, k) for k in CROP_DATA_KEYS}


def targets_sha256(dataset: Dataset) -> str:
    t = np.asarray(dataset.targets, dtype=np.int64)  # type: ignore[attr-defined]
    return hashlib.sha256(t.tobytes()).hexdigest()


def state_sha256(model: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


# --------------------------------------------------------------------------- training side: replay


class ReplaySampler(ResumableSampler):
    """``ResumableSampler`` whose epoch ``e`` asks for stored crop ``e mod K``: keys
    ``(index, sample_seed(store_seed, e mod K, index), e mod K)``. The order still shuffles with
    the run's own seed and epoch."""

    def __init__(self, base: ResumableSampler, crops: int, crop_seed: int):
        super().__init__(
            base.num_samples, batch_size=base.batch_size, seed=base.seed, shuffle=base.shuffle, rank=base.rank,
            world_size=base.world_size, pad=base.pad, with_seeds=True,
        )  # fmt: skip
        self.crops, self.crop_seed = crops, crop_seed

    def __iter__(self):
        crop = self.epoch % self.crops
        for i in self._indices()[self.start_batch * self.batch_size :]:
            yield (i, sample_seed(self.crop_seed, crop, i), crop)


class ReplayDataset(Dataset):
    """Training items ``(image, label, record)``: the stored crop ``k`` of the image and its record."""

    def __init__(self, dataset: Dataset, store: SoftLabelStore):
        self.dataset, self.store = dataset, store
        self.targets = dataset.targets  # type: ignore[attr-defined]
        self.classes = dataset.classes  # type: ignore[attr-defined]

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key):
        index, seed, crop = int(key[0]), int(key[1]), int(key[2])
        item = self.dataset[(index, seed)]
        if not _is_sample(item):
            return item  # a corrupt-sample marker: the collate sets it aside
        return item[0], item[1], self.store.record(index, crop)


def collate_replay(batch: list) -> tuple[Tensor, Tensor, list, dict[str, Tensor]]:
    """``(images, targets, corrupt, extra)``: the usual three plus the batch's stored records as
    tensors (``extra`` is what ``train_step`` hands to the teacher-logits function)."""
    from wsld.data.datasets import collate_skip_corrupt

    images, targets, bad = collate_skip_corrupt(batch)
    recs = [b[2] for b in batch if isinstance(b, tuple) and len(b) == 3]
    extra = records_to_tensors(np.concatenate(recs)) if recs else {}
    extra["target"] = targets
    return images, targets, bad, extra


def replay_training_data(cfg, train_ds: Dataset, sampler: ResumableSampler) -> tuple[Dataset, ResumableSampler, Callable]:
    """Engine hook: dataset, sampler and collate that replay the stored crops of ``distill.soft_labels``."""
    store = SoftLabelStore(cfg.distill.soft_labels)
    store.check_data(cfg, train_ds)
    return ReplayDataset(train_ds, store), ReplaySampler(sampler, store.crops, int(store.meta["seed"])), collate_replay


def stored_teacher_logits_fn(cfg, info, device: torch.device) -> Callable[[Tensor, Any], Tensor]:
    """Engine hook: ``fn(images, extra) -> teacher logits`` rebuilt from the batch's stored records."""
    store = SoftLabelStore(cfg.distill.soft_labels)
    if store.meta["classes"] != list(info.classes):
        raise UserError(f"distill.soft_labels: {store.path} was made for other classes than this data's")
    return teacher_logits_fn_for(info.num_classes)


def teacher_logits_fn_for(num_classes: int) -> Callable[[Tensor, Any], Tensor]:
    """``fn(images, extra)``: the batch's teacher logits from the records ``collate_replay`` put in ``extra``."""

    def teacher_logits(images: Tensor, extra: Any) -> Tensor:
        if not isinstance(extra, dict) or "log_prob" not in extra:
            raise RuntimeError("stored soft labels need the batch's records: build the loader with replay_training_data")
        dev = images.device
        return teacher_logits_from_stored(
            extra["log_prob"].to(dev, non_blocking=True), extra["class_index"].to(dev, non_blocking=True),
            extra["lse"].to(dev, non_blocking=True), extra["true_logit"].to(dev, non_blocking=True),
            extra["tail_lse"].to(dev, non_blocking=True), extra["target"].to(dev, non_blocking=True), num_classes,
        )  # fmt: skip

    return teacher_logits


# --------------------------------------------------------------------------- generation


class _ImageCrops(Dataset):
    """Item ``j``: all K training crops of image ``todo[j]`` with their boxes and flips."""

    def __init__(self, dataset: Dataset, todo: list[int], crops: int, seed: int):
        self.recorder = CropRecorder(dataset)
        self.targets = dataset.targets  # type: ignore[attr-defined]
        self.todo, self.crops, self.seed = todo, crops, seed

    def __len__(self) -> int:
        return len(self.todo)

    def __getitem__(self, j: int):
        i = self.todo[j]
        images, params = [], []
        for k in range(self.crops):
            item, p = self.recorder(i, sample_seed(self.seed, k, i))
            if p is None or not _is_sample(item):
                return i, None, int(self.targets[i]), None, str(getattr(item, "error", item))
            images.append(item[0])
            params.append(p)
        return i, torch.stack(images), int(self.targets[i]), torch.tensor(params, dtype=torch.int32), None


def _collate_image_crops(batch: list) -> list:
    return batch


def default_store_path(cfg, crops: int, topk: int) -> Path:
    if cfg.data.format == "builtin":
        raise UserError("give --out PATH: built-in datasets have no data folder to put the soft labels beside")
    root = Path(os.path.expanduser(str(cfg.data.data_path)))
    teacher = cfg.model.teacher.replace("/", "_")
    return root / f"{cfg.data.train_split}_soft_labels_{teacher}_K{crops}_top{topk}"


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def make_soft_labels(
    cfg, out: Path, crops: int, topk: int = 10, precision: str = "float16", batch_size: Optional[int] = None,
    log: Callable[[str], None] = lambda m: print(f"[wsld] {m}", file=sys.stderr, flush=True),
) -> dict[str, Any]:
    """Write (or finish) the soft-label store ``out``; returns a summary (counts, sizes)."""
    import lmdb
    from tqdm import tqdm

    from wsld.data import build_datasets
    from wsld.data.lmdb_reader import release_env
    from wsld.engine import (BatchNormalizer, _autocast, amp_dtype_for, ensure_teacher, seed_everything,
                             set_teacher_bn_mode, setup_runtime, use_channels_last)  # fmt: skip
    from wsld.models import build_model

    if crops < 1:
        raise UserError(f"--crops must be >= 1, got {crops}")
    if topk < 1:
        raise UserError(f"--topk must be >= 1, got {topk}")
    if precision not in PRECISIONS:
        raise UserError(f"--precision must be one of {', '.join(PRECISIONS)}, got {precision}")
    if cfg.model.teacher_bn_mode != "eval":
        raise UserError(
            "model.teacher_bn_mode=train uses batch statistics, so a crop's output depends on its batch and cannot be "
            "stored: set model.teacher_bn_mode=eval"
        )
    rt = setup_runtime()
    if rt.distributed:
        raise UserError("run 'wsld soft-labels' as one process (it decodes with data.workers loader processes)")
    seed_everything(cfg.train.seed)
    train_ds, _, info = build_datasets(cfg.data, seed=cfg.train.seed)
    if not cfg.data.augment and crops > 1:
        log(f"data.augment=false: all {crops} crops of an image are the same; --crops 1 stores the same information")
    if topk > info.num_classes:
        log(f"--topk {topk} is more than the {info.num_classes} classes: storing all {info.num_classes}")
        topk = info.num_classes
    weights = ensure_teacher(cfg, rt, log)
    teacher = build_model(cfg.model.teacher, info.num_classes, in_channels=info.in_channels, weights=weights, role="teacher")
    dev = rt.device
    channels_last = use_channels_last(cfg, dev)
    teacher.to(dev, memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    set_teacher_bn_mode(teacher, "eval")
    amp = amp_dtype_for(cfg.train.amp, dev)
    normalize = BatchNormalizer(info.mean, info.std, dev, channels_last)
    n = len(train_ds)
    meta = {
        "format": FORMAT, "version": FORMAT_VERSION, "crops": crops, "topk": topk, "precision": precision,
        "num_classes": info.num_classes, "classes": list(info.classes), "count": n,
        "teacher": cfg.model.teacher, "teacher_weights": str(weights), "teacher_sha256": state_sha256(teacher),
        "seed": cfg.train.seed, "data": crop_data_config(cfg), "targets_sha256": targets_sha256(train_ds),
        "amp": str(amp), "record_bytes": record_dtype(topk, info.num_classes, precision).itemsize,
    }  # fmt: skip
    dtype = record_dtype(topk, info.num_classes, precision)
    per_image = crops * dtype.itemsize
    # LMDB stores small values inline (~16 B overhead); bigger ones on whole overflow pages
    est = per_image + 64 if per_image < 1500 else (per_image // 4096 + 2) * 4096
    out = Path(os.path.expanduser(str(out)))
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file: give a folder path for the LMDB store")
    if out.is_dir() and any(out.iterdir()) and not (out / "data.mdb").is_file():
        raise UserError(f"--out {out} is a folder that holds other files: give a new or empty folder")
    out.mkdir(parents=True, exist_ok=True)
    release_env(out)  # a read-only handle of this process would block the writer
    try:
        env = lmdb.open(str(out), map_size=int(n * est * 1.25) + (64 << 20), subdir=True, readahead=False, meminit=False)
    except lmdb.Error as e:
        raise UserError(f"cannot open {out} as an LMDB for writing: {e}") from None
    try:
        old, _ = _read_meta(env)
        if old is None and env.stat()["entries"] > 0:
            raise UserError(f"--out {out} is an LMDB but not a soft-label store: choose another folder")
        if old is not None:
            diff = [k for k in IDENTITY_KEYS if old.get(k) != meta.get(k)]
            if diff:
                raise UserError(
                    f"{out} holds soft labels made with other {', '.join(diff)}: remove it or choose another --out"
                )
        if old is None:
            with env.begin(write=True) as txn:
                txn.put(META_KEY, json.dumps(meta).encode())
        with env.begin() as txn:
            have = {struct.unpack(">Q", k)[0] for k in txn.cursor().iternext(keys=True, values=False) if len(k) == 8}
        todo = [i for i in range(n) if i not in have]
        if have:
            log(f"{out}: {len(have)} of {n} images already done, {len(todo)} to go")
        log(
            f"soft labels: {n} images x {crops} crops, teacher {cfg.model.teacher} ({weights}), top-{topk} in {precision}, "
            f"device={dev}, amp={amp} -> {out}"
        )
        bad_images = 0
        per_batch = max(1, (batch_size or cfg.data.batch_size) // crops)
        loader = torch.utils.data.DataLoader(
            _ImageCrops(train_ds, todo, crops, cfg.train.seed), batch_size=per_batch, shuffle=False,
            num_workers=cfg.data.workers, collate_fn=_collate_image_crops,
            prefetch_factor=4 if cfg.data.workers > 0 else None,
        )  # fmt: skip
        bar = tqdm(total=len(todo), desc="soft labels", unit="img", disable=not cfg.train.progress, mininterval=1.0)
        with torch.no_grad():
            for items in loader:
                good = [it for it in items if it[1] is not None]
                values: dict[int, bytes] = {}
                for it in items:
                    if it[1] is None:
                        bad_images += 1
                        log(f"image {it[0]} ({train_ds.describe(it[0]) if hasattr(train_ds, 'describe') else it[0]}) "
                            f"unreadable, stored without crops: {it[4]}")  # fmt: skip
                        values[it[0]] = b""
                if good:
                    x = normalize(torch.cat([it[1] for it in good]))
                    with _autocast(dev, amp):
                        logits = teacher(x)
                    y = torch.tensor([it[2] for it in good for _ in range(crops)], device=dev)
                    rec = records_from_logits(logits, y, topk, precision)
                    rec["box"] = torch.cat([it[3][:, :4] for it in good]).numpy()
                    rec["flip"] = torch.cat([it[3][:, 4] for it in good]).numpy()
                    for j, it in enumerate(good):
                        values[it[0]] = rec[j * crops : (j + 1) * crops].tobytes()
                while True:
                    try:
                        with env.begin(write=True) as txn:
                            for i, v in values.items():
                                txn.put(image_key(i), v)
                        break
                    except lmdb.MapFullError:
                        env.set_mapsize(env.info()["map_size"] * 2)
                bar.update(len(items))
        bar.close()
        entries = _image_count(env)
        with env.begin() as txn:
            bad_images = sum(1 for k, v in txn.cursor() if len(k) == 8 and len(v) == 0)
        if entries != n:
            raise DataError(f"{out}: {entries} of {n} images stored after the pass; {FINISH_HINT}")
        with env.begin(write=True) as txn:
            txn.put(COMPLETE_KEY, json.dumps({"count": n, "unreadable": bad_images, "time": round(time.time(), 3)}).encode())
        env.sync(True)
    finally:
        env.close()
    size = (out / "data.mdb").stat().st_size
    summary = {
        "path": str(out), "images": n, "new_images": len(todo), "crops": crops, "topk": topk, "precision": precision,
        "record_bytes_per_image": per_image, "file_bytes": size, "file_bytes_per_image": size / max(1, n),
        "unreadable": bad_images,
    }  # fmt: skip
    return summary


# --------------------------------------------------------------------------- CLI


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "soft-labels",
        help="store the teacher's outputs on K replayable training crops per image (train with distill.soft_labels=PATH)",
        description="Run the teacher once on K training crops of every training image (drawn with the training "
        "augmentation's own seeds) and store per crop the box, the flip bit, the top-k log-probabilities (float16), "
        "the log-sum-exp of all logits and the true class's logit in an LMDB. Training with "
        "distill.soft_labels=PATH then replays crop (epoch mod K) and needs no teacher model. Resumable: run the "
        "same command again to finish an interrupted store. Uses the same CONFIG and key=value overrides as "
        "'wsld train'; data.workers loader processes decode in parallel.",
    )
    p.add_argument("args", nargs="*", metavar="[CONFIG] [key=value ...]", help="YAML config file, then dotted overrides")
    p.add_argument("--crops", type=int, required=True, metavar="K", help="crops per image (training epoch e replays crop e mod K)")
    p.add_argument("--topk", type=int, default=10, metavar="k", help="teacher classes stored per crop (default 10; = classes: exact)")
    p.add_argument("--precision", choices=sorted(PRECISIONS), default="float16", help="of the stored log-probabilities (default float16)")
    p.add_argument("--out", metavar="PATH", help="store folder (default: beside the training data, DATA_PATH/<split>_soft_labels_...)")
    p.add_argument("--batch-size", type=int, metavar="N", help="crops per teacher forward (default data.batch_size)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from wsld.commands.train import split_config_and_overrides
    from wsld.config import load_config

    config_path, overrides = split_config_and_overrides(args.args)
    cfg = load_config(config_path, overrides)
    if args.batch_size is not None and args.batch_size < 1:
        raise UserError(f"--batch-size must be >= 1, got {args.batch_size}")
    out = Path(args.out) if args.out else default_store_path(cfg, args.crops, args.topk)
    s = make_soft_labels(cfg, out, args.crops, args.topk, args.precision, args.batch_size)
    print(
        f"soft labels: {s['images']} images ({s['new_images']} new) x {s['crops']} crops, top-{s['topk']} {s['precision']} "
        f"in {s['path']}\n  size: {_human(s['record_bytes_per_image'])} of records per image, "
        f"{_human(s['file_bytes_per_image'])} per image on disk, {_human(s['file_bytes'])} total"
        + (f"\n  {s['unreadable']} unreadable images stored without crops" if s["unreadable"] else "")
        + f"\n  train with: distill.soft_labels={s['path']}"
    )
    return 0
