"""The data's identity: a cheap digest of what a run trains and evaluates on, and the one line that says how two differ.

An identity is a small dict, stored in ``run.json``, every checkpoint, the soft-label store's
metadata and (as its digest) the teacher cache key::

    {"format": "wsld-data-1", "classes": [names in label order],
     "train": {"count": n, "per_class": [n_0, ...], "sha256": ...}, "val": {...}}

A split's ``sha256`` covers each sample, in order, by what can be known without decoding it:
image files (folder and list formats) by path, size in bytes and label (one ``stat`` per file, on
a thread pool); LMDBs (wsld or reference) by every record's key and value length, read from the
LMDB's own index pages (the image bytes are not read), with the labels; built-in datasets by
their pixel arrays and labels (in memory already); a subset (long tail, holdout) by its base and
its indices. So a renamed, reordered, added or removed class, an added or removed image, and an
image replaced by another of another size all change the identity; where the data lives does not.
"""

from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Optional

import numpy as np

from wsld.errors import UserError

FORMAT = "wsld-data-1"
SPLITS = ("train", "val")
# the override named in every refusal (wsld train and wsld eval)
OVERRIDE = "--allow-data-change"


class DataChanged(UserError):
    """The data is not the data something was made from (``what``: the difference, in words)."""

    def __init__(self, message: str, what: str):
        super().__init__(message)
        self.what = what


def data_identity(train, val) -> dict[str, Any]:
    """The identity of a run's data: its class list and both splits."""
    return {"format": FORMAT, "classes": list(train.classes), "train": split_identity(train), "val": split_identity(val)}


def split_identity(dataset) -> dict[str, Any]:
    """``{"count", "per_class", "sha256"}`` of one split (see the module doc)."""
    targets = np.asarray(dataset.targets, dtype=np.int64)
    per_class = np.bincount(targets, minlength=len(dataset.classes)).tolist() if len(targets) else [0] * len(dataset.classes)
    h = hashlib.sha256()
    h.update(json.dumps(list(dataset.classes)).encode("utf-8", "surrogateescape"))
    _samples(dataset, h)
    return {"count": int(len(targets)), "per_class": per_class, "sha256": h.hexdigest()}


def recorded_identity(recorded: Optional[dict]) -> Optional[dict]:
    """The identity in a record (``run.json``'s ``data``, or a checkpoint's ``{"classes", "data"}``);
    for a run made before wsld recorded one, its class list alone; None when neither is there."""
    recorded = recorded or {}
    if recorded.get("data"):
        return dict(recorded["data"])
    return {"format": FORMAT, "classes": recorded["classes"]} if recorded.get("classes") else None


def identity_digest(identity: Optional[dict]) -> str:
    """A short digest of a whole identity (the teacher cache key takes it)."""
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16] if identity else ""


def _samples(dataset, h) -> None:
    """Feed ``h`` with what identifies each sample of ``dataset``, in order."""
    from wsld.data.build import SubsetWithTargets
    from wsld.data.builtin import TensorImageDataset
    from wsld.data.datasets import FileSource, LmdbSource, PhotoDataset

    if isinstance(dataset, SubsetWithTargets):
        h.update(b"subset\0")
        _samples(dataset.dataset, h)
        h.update(np.asarray(dataset.indices, dtype="<i8").tobytes())
        return
    h.update(np.asarray(dataset.targets, dtype="<i8").tobytes())
    if isinstance(dataset, TensorImageDataset):
        images = dataset.images.contiguous()
        h.update(f"arrays {tuple(images.shape)} {images.dtype}\0".encode())
        h.update(images.numpy().tobytes())
    elif isinstance(dataset, PhotoDataset) and isinstance(dataset.source, FileSource):
        src = dataset.source
        paths = [src.paths[i] for i in range(len(src))]
        sizes = _file_sizes(str(src.split_dir), paths)
        h.update(b"files\0")
        h.update("".join(f"{p}\t{s}\n" for p, s in zip(paths, sizes)).encode("utf-8", "surrogateescape"))
    elif isinstance(dataset, PhotoDataset) and isinstance(dataset.source, LmdbSource):
        _lmdb_records(dataset.source.reader.index, h)
    else:  # a dataset this module does not know: its labels and length only
        h.update(f"{type(dataset).__name__} {len(dataset)}\0".encode())


def _file_sizes(split_dir: str, paths: list[str], threads: int = 16) -> list[int]:
    """The size of each file (-1 for one that cannot be read: reported as corrupt when used),
    stat'ed on a thread pool: on a network file system the calls overlap."""

    def sizes(chunk: list[str]) -> list[int]:
        out = []
        for p in chunk:
            try:
                out.append(os.stat(os.path.join(split_dir, p)).st_size)
            except OSError:
                out.append(-1)
        return out

    step = max(1, -(-len(paths) // (threads * 8)))
    chunks = [paths[i : i + step] for i in range(0, len(paths), step)]
    with ThreadPoolExecutor(min(threads, max(1, len(chunks)))) as pool:
        return [s for part in pool.map(sizes, chunks) for s in part]


def _lmdb_records(index, h) -> None:
    """Every record's key and value length, from the LMDB's index pages (values are not read)."""
    from wsld.data.lmdb_files import reading
    from wsld.data.lmdb_reader import DAMAGED_HINT, shared_env

    h.update(b"lmdb\0")
    if index.keys is not None:  # reference format: the datalist gives the order
        h.update(b"\n".join(index.keys.raw(i) for i in range(len(index.keys))))
    with reading(index.path, DAMAGED_HINT), shared_env(index.path).begin(buffers=True) as txn:
        lengths = bytearray()
        for key, value in txn.cursor():
            lengths += bytes(key) + b"\0" + len(value).to_bytes(8, "little")
        h.update(bytes(lengths))


def identity_difference(was: Optional[dict], now: dict, splits: tuple[str, ...] = SPLITS) -> Optional[str]:
    """How the data ``now`` differs from the data ``was`` (None: the same, or nothing recorded),
    in words: classes renamed, reordered, added or removed; samples added or removed; other content."""
    if not was or was.get("format") != FORMAT:
        return None
    why = class_difference(was.get("classes") or [], now["classes"])
    if why:
        return why
    for split in splits:
        a, b = was.get(split), now.get(split)
        if not a or not b or a.get("sha256") == b.get("sha256"):
            continue
        if a["count"] != b["count"]:
            n = b["count"] - a["count"]
            moved = [f"'{c}' {x} -> {y}" for c, x, y in zip(now["classes"], a["per_class"], b["per_class"]) if x != y]
            where = f" (per class: {', '.join(moved[:3])}{', ...' if len(moved) > 3 else ''})" if moved else ""
            return f"the {split} split has {b['count']} samples, {abs(n)} {'more' if n > 0 else 'fewer'} than {a['count']}{where}"
        if a["per_class"] != b["per_class"]:
            return f"the {split} split has its {a['count']} samples in other classes (labels changed)"
        return f"the {split} split holds other content (the same {a['count']} samples and counts per class, other files, sizes or labels)"
    return None


def class_difference(was: list[str], now: list[str]) -> Optional[str]:
    """How class list ``now`` differs from ``was`` (None: the same), in words."""
    if was == now:
        return None
    if sorted(was) == sorted(now):
        k = next(i for i, (a, b) in enumerate(zip(was, now)) if a != b)
        return f"the classes are in another order (label {k} was '{was[k]}', is now '{now[k]}')"
    gone, new = [c for c in was if c not in set(now)], [c for c in now if c not in set(was)]
    if len(gone) == len(new) == 1:
        return f"class '{gone[0]}' was renamed '{new[0]}' (labels follow the sorted class names)"
    parts = []
    if new:
        parts.append(f"{len(new)} classes added ('{new[0]}'{', ...' if len(new) > 1 else ''})")
    if gone:
        parts.append(f"{len(gone)} classes removed ('{gone[0]}'{', ...' if len(gone) > 1 else ''})")
    return f"{' and '.join(parts)}: {len(now)} classes, were {len(was)}"


def check_identity(was: Optional[dict], now: dict, *, refusal: str, subject: str, allow: bool, say,
                   splits: tuple[str, ...] = SPLITS) -> None:  # fmt: skip
    """Refuse (``DataChanged``) data that differs from ``was``: one line, ``refusal`` with ``{diff}``
    filled in and the override named; with ``allow`` (the override) say so (``subject``) and go on."""
    diff = identity_difference(was, now, splits)
    if not diff:
        return
    if allow:
        say(f"{subject} on other data than recorded ({diff}): accepted ({OVERRIDE})")
        return
    raise DataChanged(f"{refusal.format(diff=diff)}, or pass {OVERRIDE} to accept it", diff)
