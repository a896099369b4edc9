"""The soft-label store: its record layout, the stored form of teacher logits and their rebuild, and the LMDB reader (format: docs/soft_labels.md)."""

from __future__ import annotations

import hashlib
import json
import os
import struct
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from wsld.data.lmdb_files import SOFT_LABEL_STORE_KEY, reading, seal, unseal
from wsld.errors import DataError, UserError

FORMAT = "wsld-soft-labels"
FORMAT_VERSION = 3  # 2: records carry others_lse (exact rebuild for confident teachers); 3: values carry a CRC-32
READABLE_VERSIONS = (1, 2, 3)
META_KEY, COMPLETE_KEY = SOFT_LABEL_STORE_KEY, b"__wsld_soft_labels_complete__"  # never 8 bytes long
# what to do about a damaged store
REMAKE_HINT = "remake it with 'wsld soft-labels' (or copy it again)"
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
RECORD_TENSORS = ("log_prob", "class_index", "lse", "true_logit", "tail_lse", "others_lse")


def record_dtype(topk: int, num_classes: int, precision: str = "float16", version: int = FORMAT_VERSION) -> np.dtype:
    """Packed record of one crop: ``box`` (top, left, height, width in source-image pixels;
    negative = padding), ``flip``, ``class_index`` (top-k classes, most probable first),
    ``log_prob`` (their log-probabilities at T = 1), ``lse`` (log-sum-exp of all logits),
    ``true_logit`` (the labelled class's logit), ``tail_lse`` (log-sum-exp of the classes neither
    stored nor labelled) and ``others_lse`` (of the stored classes other than the labelled one;
    not in version 1). The float32 fields are float64 values rounded once."""
    index_type = "<u2" if num_classes <= 65535 else "<i4"
    fields = [
        ("box", "<i4", (4,)), ("flip", "u1"), ("class_index", index_type, (topk,)),
        ("log_prob", PRECISIONS[precision], (topk,)), ("lse", "<f4"), ("true_logit", "<f4"), ("tail_lse", "<f4"),
    ]  # fmt: skip
    if version >= 2:
        fields.append(("others_lse", "<f4"))
    return np.dtype(fields)


def image_key(index: int) -> bytes:
    return struct.pack(">Q", index)


def teacher_logits_from_stored(
    log_prob: Tensor, class_index: Tensor, lse: Tensor, true_logit: Tensor, tail_lse: Tensor, target: Tensor,
    num_classes: int, others_lse: Optional[Tensor] = None,
) -> Tensor:
    """Full (N, C) teacher logits rebuilt from stored top-k values (float32).

    Logits are only defined up to a constant, so the rebuild works in T = 1 log-probabilities and
    adds ``lse`` at the end: the labelled class gets ``true_logit - lse``; the ``n`` unstored
    classes share ``tail_lse - lse`` equally; the other stored classes share ``others_lse - lse``
    in the proportions of their stored log-probabilities. No step subtracts probabilities, so a
    confident teacher loses nothing: with k = C and float32 every logit is exact to float32.

    ``log_prob``/``class_index``: (N, k) top-k log-probabilities at T = 1 and their classes;
    ``lse``: (N,) log-sum-exp of all C logits; ``true_logit``: (N,) the logit of ``target``;
    ``tail_lse``/``others_lse``: (N,) log-sum-exp of the logits of the classes neither in the
    top-k nor ``target`` / in the top-k but not ``target`` (-inf when there are none);
    ``others_lse=None`` (version-1 records): that mass is taken as ``1 - p(y) - tail``.
    """
    n, c = log_prob.shape[0], num_classes
    dev = log_prob.device
    rows = torch.arange(n, device=dev)
    idx = class_index.long()
    lse = lse.float()
    lp_y = true_logit.float() - lse  # the WSLD weight needs CE_teacher(y) = -lp_y
    tail = (tail_lse.float() - lse).clamp_max(0.0)  # log of the unstored classes' total mass
    others = idx != target[:, None]
    lp_top = log_prob.float().masked_fill(~others, float("-inf"))
    if others_lse is not None:
        left = others_lse.float() - lse  # log of the stored non-target classes' mass: no cancellation
    else:
        left = (1.0 - lp_y.exp() - tail.exp()).clamp_min(1e-30).log()
    # the stored log-probs only set the split among those classes: one common shift puts their
    # total at ``left`` (and absorbs the float16 rounding)
    shift = torch.where(others.any(dim=1), left - torch.logsumexp(lp_top, dim=1), torch.zeros_like(left))
    known = torch.zeros(n, c, device=dev, dtype=torch.bool).scatter_(1, idx, True)
    known[rows, target] = True
    n_rest = c - known.sum(dim=1)
    lp = (tail - torch.log(n_rest.clamp_min(1).float()))[:, None].expand(n, c).clone()  # unstored: equal split
    lp.scatter_(1, idx, log_prob.float() + shift[:, None])
    lp[rows, target] = lp_y
    return lp + lse[:, None]


def logits_from_records(records: dict[str, Tensor], target: Tensor, num_classes: int, device: torch.device) -> Tensor:
    """``teacher_logits_from_stored`` on the tensors ``records_to_tensors`` made, moved to ``device``."""
    t = {k: records[k].to(device, non_blocking=True) for k in RECORD_TENSORS if k in records}
    return teacher_logits_from_stored(
        t["log_prob"], t["class_index"], t["lse"], t["true_logit"], t["tail_lse"], target.to(device, non_blocking=True),
        num_classes, t.get("others_lse"),
    )  # fmt: skip


def records_from_logits(logits: Tensor, target: Tensor, topk: int, precision: str = "float16") -> np.ndarray:
    """The stored form of teacher logits (N, C) for labels ``target`` (``box``/``flip`` left 0).

    Computed in float64 so that each stored float32 is the rounding of the exact value."""
    z = logits.detach().double()
    target = target.to(z.device)
    lse = torch.logsumexp(z, dim=1)
    top_val, top_idx = z.topk(topk, dim=1)
    unstored = z.scatter(1, top_idx, float("-inf")).scatter(1, target[:, None], float("-inf"))
    others = torch.full_like(z, float("-inf")).scatter(1, top_idx, top_val).scatter(1, target[:, None], float("-inf"))
    rec = np.zeros(len(z), dtype=record_dtype(topk, z.shape[1], precision))
    rec["class_index"] = top_idx.cpu().numpy()
    rec["log_prob"] = (top_val - lse[:, None]).clamp_min(-6e4).cpu().numpy()  # finite in float16
    rec["lse"] = lse.cpu().numpy()
    rec["true_logit"] = z.gather(1, target[:, None])[:, 0].cpu().numpy()
    rec["tail_lse"] = torch.logsumexp(unstored, dim=1).cpu().numpy()
    rec["others_lse"] = torch.logsumexp(others, dim=1).cpu().numpy()
    return rec


def records_to_tensors(records: np.ndarray) -> dict[str, Tensor]:
    """Structured records (N,) -> the tensors ``teacher_logits_from_stored`` takes (and box, flip)."""
    out = {
        k: torch.from_numpy(np.array(records[k], copy=True))  # a copy: a one-record view has strides torch refuses
        for k in ("log_prob", "lse", "true_logit", "tail_lse", "others_lse") if k in records.dtype.names
    }  # fmt: skip
    out["class_index"] = torch.from_numpy(records["class_index"].astype(np.int64))
    out["box"] = torch.from_numpy(records["box"].astype(np.int64))
    out["flip"] = torch.from_numpy(records["flip"].astype(np.bool_))
    return out


def read_meta(env, path: Path | str = "") -> tuple[Optional[dict], Optional[dict]]:
    """``(meta, completion)`` records of an open store environment (None where missing); damaged
    records are a DataError naming ``path``."""
    with reading(path, REMAKE_HINT), env.begin() as txn:
        meta, done = txn.get(META_KEY), txn.get(COMPLETE_KEY)
    try:
        return (json.loads(meta) if meta else None), (json.loads(done) if done else None)
    except ValueError as e:
        raise DataError(f"soft-label store {path}: its metadata record is damaged ({e}): {REMAKE_HINT}") from None


def encode_value(index: int, records: np.ndarray) -> bytes:
    """Image ``index``'s stored value: its K packed records and the CRC-32 of its key and records
    (format version 3)."""
    return seal(records.tobytes(), image_key(index))


def image_count(env, path: Path | str = "") -> int:
    """Image records: every key but the two metadata keys."""
    with reading(path, REMAKE_HINT), env.begin() as txn:
        return int(txn.stat()["entries"]) - sum(1 for k in (META_KEY, COMPLETE_KEY) if txn.get(k) is not None)


class SoftLabelStore:
    """A finished soft-label store opened for reading; safe in DataLoader workers (opens per process).

    One LMDB directory: ``META_KEY`` (JSON: format, version, crops K, topk k, precision, classes,
    count, teacher and the SHA-256 of its weights, seed, the crop data keys, the labels' SHA-256),
    written first; the 8-byte big-endian image index -> its K packed records and (version 3) their
    CRC-32, checked on every read (empty: the image was unreadable); ``COMPLETE_KEY`` written last
    (without it the store is incomplete and refused).
    """

    def __init__(self, path: str | Path):
        self.path = Path(os.path.expanduser(str(path)))
        if not (self.path / "data.mdb").is_file():
            raise DataError(f"distill.soft_labels: no soft-label store at {self.path} (make one with 'wsld soft-labels')")
        from wsld.data.lmdb_reader import shared_env

        env = shared_env(self.path, REMAKE_HINT)  # this process's read-only handle (DataLoader workers open their own)
        meta, done = read_meta(env, self.path)
        n_done = image_count(env, self.path) if meta is not None else 0
        if meta is None or meta.get("format") != FORMAT:
            raise DataError(f"distill.soft_labels: {self.path} is an LMDB but not a wsld soft-label store")
        if meta.get("version") not in READABLE_VERSIONS:
            raise DataError(
                f"distill.soft_labels: {self.path} has store version {meta.get('version')}, this wsld reads "
                f"{', '.join(map(str, READABLE_VERSIONS))}"
            )
        if done is None:
            raise DataError(
                f"distill.soft_labels: {self.path} is incomplete ({n_done} of {meta['count']} images done): {FINISH_HINT}"
            )
        self.meta = meta
        self.version = int(meta["version"])
        self.crops, self.topk = int(meta["crops"]), int(meta["topk"])
        self.dtype = record_dtype(self.topk, len(meta["classes"]), meta["precision"], self.version)
        if meta.get("record_bytes") != self.dtype.itemsize:
            raise DataError(f"distill.soft_labels: {self.path} holds records of another layout (made by another wsld version): remake it")

    def records(self, index: int) -> np.ndarray:
        """The K records of image ``index`` (empty if it was unreadable when the store was made)."""
        from wsld.data.lmdb_reader import shared_env

        with reading(self.path, REMAKE_HINT), shared_env(self.path, REMAKE_HINT).begin(buffers=False) as txn:
            value = txn.get(image_key(index))
        if value is None:
            raise DataError(f"soft-label store {self.path} has no record of image {index}: it does not belong to this data")
        if not value:
            return np.frombuffer(value, dtype=self.dtype)
        if self.version >= 3:
            try:
                value = unseal(value, image_key(index))
            except ValueError as e:
                raise DataError(f"soft-label store {self.path}: the records of image {index} are damaged ({e}): "
                                f"{REMAKE_HINT}") from None
        if len(value) != self.crops * self.dtype.itemsize:
            raise DataError(f"soft-label store {self.path}: the records of image {index} hold {len(value)} bytes, not "
                            f"{self.crops} x {self.dtype.itemsize}: it is damaged; {REMAKE_HINT}")
        return np.frombuffer(value, dtype=self.dtype)

    def record(self, index: int, crop: int) -> np.ndarray:
        recs = self.records(index)
        if len(recs) == 0:
            raise DataError(
                f"image {index} could not be read when {self.path} was made, but reads now: remake the soft labels"
            )
        return recs[crop : crop + 1]

    def check_classes(self, classes: list[str]) -> None:
        if self.meta["classes"] != list(classes):
            raise UserError(
                f"distill.soft_labels: {self.path} was made for other classes ({len(self.meta['classes'])}, first "
                f"{self.meta['classes'][:1]}) than this data's ({len(classes)}, first {list(classes)[:1]})"
            )

    def check_data(self, data_cfg, train_ds: Dataset) -> None:
        """Refuse a store made from other data or another crop pipeline, with the keys that differ.
        ``data_cfg``: the run's ``data`` config section."""
        meta = self.meta
        self.check_classes(list(train_ds.classes))  # type: ignore[attr-defined]
        if meta["count"] != len(train_ds):  # type: ignore[arg-type]
            raise UserError(
                f"distill.soft_labels: {self.path} holds {meta['count']} images, the training split has {len(train_ds)}"  # type: ignore[arg-type]
            )
        if meta["targets_sha256"] != targets_sha256(train_ds):
            raise UserError(f"distill.soft_labels: {self.path} was made for other labels than this training split")
        now = crop_data_config(data_cfg)
        diff = [k for k in now if meta["data"].get(k) != now[k]]
        if diff:
            was = ", ".join(f"data.{k}={meta['data'].get(k)}" for k in diff)
            raise UserError(f"distill.soft_labels: {self.path} was made with {was}: use the same values or remake it")


def crop_data_config(data_cfg) -> dict[str, Any]:
    """The values of ``CROP_DATA_KEYS`` in a ``data`` config section."""
    return {k: getattr(data_cfg, k) for k in CROP_DATA_KEYS}


def targets_sha256(dataset: Dataset) -> str:
    t = np.asarray(dataset.targets, dtype=np.int64)  # type: ignore[attr-defined]
    return hashlib.sha256(t.tobytes()).hexdigest()


def state_sha256(model: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()
