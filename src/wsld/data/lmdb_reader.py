"""Reading packed LMDBs: wsld's own format and the reference tool's.

wsld format (written by ``wsld data pack``, ``FORMAT_VERSION`` 1), one LMDB per split:

- ``b"%010d" % i`` -> ``msgpack {"path": str, "label": int, "data": bin}``: sample ``i``, its path
  relative to the split folder, its label, and the image file's original bytes (or a JPEG
  re-encoded at the packed size when packed with ``--resize-short``).
- ``__wsld_meta__`` -> ``msgpack {"format": "wsld-lmdb", "version", "split", "classes", "count",
  "labels": bin (int32 little-endian, one per sample), "list_sha256", "resize_short", ...}``,
  written first, so that an interrupted pack can be resumed.
- ``__wsld_progress__`` -> number of samples committed (a prefix ``0..n-1``), updated with each
  write transaction.
- ``__wsld_complete__`` -> ``msgpack {"count": n}``, written last. Without it the LMDB is an
  interrupted pack, and training refuses it.

Reference tool's format (its ``dataset/img2lmdb.py``; docs/data.md, LMDB formats): no metadata; keys are the lines of ``<split>_datalist``
(``classfolder/filename``) beside the LMDB folder, which also give the sample order; values are
``msgpack bin(jpeg_bytes + label as uint16 little-endian)``.
"""

from __future__ import annotations

import os
import re
import threading
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import lmdb
import msgpack
import numpy as np

from wsld.data.lmdb_files import check_data_file, damaged, reading
from wsld.data.strtable import StringTable
from wsld.errors import DataError

FORMAT_NAME = "wsld-lmdb"
FORMAT_VERSION = 1
META_KEY = b"__wsld_meta__"
PROGRESS_KEY = b"__wsld_progress__"
COMPLETE_KEY = b"__wsld_complete__"
DATALIST_SUFFIX = "_datalist"
REPACK_HINT = "re-run 'wsld data pack' with the same arguments to finish it"
# what to do about a damaged data LMDB
DAMAGED_HINT = "copy it again, or re-pack it with 'wsld data pack ROOT --split SPLIT --out PATH --overwrite'"


def record_key(i: int) -> bytes:
    return b"%010d" % i


# file and class names that are not valid UTF-8 (kept as surrogate escapes by the list readers)
# are stored as their original bytes and come back unchanged
NAME_ERRORS = "surrogateescape"


def record_crc(path: str, label: int, data: bytes) -> int:
    """CRC-32 of a record's path, label and image bytes (zlib's, gigabytes per second: free beside a decode)."""
    head = f"{path}\t{int(label)}\n".encode("utf-8", NAME_ERRORS)
    return zlib.crc32(data, zlib.crc32(head))


def encode_record(path: str, label: int, data: bytes) -> bytes:
    rec = {"path": path, "label": int(label), "data": data, "crc32": record_crc(path, label, data)}
    return msgpack.packb(rec, use_bin_type=True, unicode_errors=NAME_ERRORS)


class RecordError(Exception):
    """A stored record that cannot be read (missing key, bad encoding)."""


def decode_record(value) -> tuple[str, int, bytes]:
    """``(path, label, image bytes)`` of a wsld record."""
    try:
        rec = msgpack.unpackb(value, raw=False, unicode_errors=NAME_ERRORS)
        path, label, data, crc = rec["path"], int(rec["label"]), rec["data"], rec.get("crc32")
    except Exception as e:  # noqa: BLE001 - any malformed value
        raise RecordError(f"malformed record ({type(e).__name__}: {e})") from None
    if crc is not None and crc != record_crc(path, label, data):  # packs from before wsld 0.x carry none
        raise RecordError("checksum mismatch: the record's bytes changed after packing (a damaged disk or copy)")
    return path, label, data


def decode_reference_value(value) -> tuple[bytes, int]:
    """``(jpeg bytes, label)`` of a reference-tool value: msgpack bin whose last 2 bytes are the label."""
    try:
        payload = msgpack.unpackb(value, raw=True)
    except Exception as e:  # noqa: BLE001
        raise RecordError(f"malformed value ({type(e).__name__}: {e})") from None
    if not isinstance(payload, bytes) or len(payload) < 2:
        raise RecordError("malformed value (expected a msgpack bin of image bytes + 2-byte label)")
    return payload[:-2], int.from_bytes(payload[-2:], "little")


def is_lmdb_dir(path: str | Path) -> bool:
    return (Path(path) / "data.mdb").is_file()


def open_readonly(path: str | Path, remedy: str = DAMAGED_HINT) -> lmdb.Environment:
    """A new read-only environment with the settings for training: no lock-file writes, no readahead
    (random access), no meminit. Prefer ``shared_env``: LMDB allows one open per path per process.
    ``data.mdb`` is checked against its recorded size first (a truncated file would be a SIGBUS)."""
    check_data_file(path, remedy)
    try:
        return lmdb.open(str(path), readonly=True, lock=False, readahead=False, meminit=False, subdir=True,
                         max_readers=2048)
    except lmdb.Error as e:
        raise damaged(path, e, remedy) from None


_ENVS: dict[str, tuple[int, lmdb.Environment]] = {}
_ENVS_LOCK = threading.Lock()


def shared_env(path: str | Path, remedy: str = DAMAGED_HINT) -> lmdb.Environment:
    """This process's read-only environment for ``path``, opened on first use.

    Keyed by pid: a DataLoader worker (forked or spawned) opens its own on first use instead of
    using one inherited across fork. Never closed except by ``release_env``.
    """
    key, pid = os.path.realpath(path), os.getpid()
    entry = _ENVS.get(key)
    if entry is None or entry[0] != pid:
        with _ENVS_LOCK:
            entry = _ENVS.get(key)
            if entry is not None and entry[0] != pid:
                # inherited across fork: never used here; closing the child's copy (its mapping and file
                # descriptor; no lock file with lock=False) frees the path for a handle of our own
                try:
                    entry[1].close()
                except lmdb.Error:
                    pass
                entry = None
            if entry is None:
                entry = (pid, open_readonly(path, remedy))
                _ENVS[key] = entry
    return entry[1]


def release_env(path: str | Path) -> None:
    """Close this process's read-only environment for ``path`` (before writing to it)."""
    key = os.path.realpath(path)
    with _ENVS_LOCK:
        entry = _ENVS.pop(key, None)
    if entry is not None and entry[0] == os.getpid():
        entry[1].close()


def datalist_for(lmdb_path: Path) -> Optional[Path]:
    """The reference tool's ``<split>_datalist`` beside ``<out>/<split>`` (also for ``<split>_<size>``)."""
    cands = [lmdb_path.parent / f"{lmdb_path.name}{DATALIST_SUFFIX}"]
    m = re.fullmatch(r"(.+)_(\d+)", lmdb_path.name)
    if m:
        cands.append(lmdb_path.parent / f"{m.group(1)}{DATALIST_SUFFIX}")
    return next((c for c in cands if c.is_file()), None)


@dataclass
class LmdbIndex:
    """What a dataset needs to know about an LMDB before reading any image."""

    path: Path
    kind: str  # "wsld" | "reference"
    classes: list[str]
    labels: np.ndarray  # int64, one per sample, in sample order
    keys: Optional[StringTable] = None  # reference format: the datalist lines (keys), in order
    meta: dict = field(default_factory=dict)
    complete: bool = True
    stored_labels: Optional[np.ndarray] = None  # reference format: labels read from the values, if read
    notes: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.labels)

    def key(self, i: int) -> bytes:
        if self.keys is not None:
            return self.keys.raw(i)
        return record_key(i)


def read_meta(txn) -> Optional[dict]:
    raw = txn.get(META_KEY)
    if raw is None:
        return None
    try:
        meta = msgpack.unpackb(raw, raw=False, unicode_errors=NAME_ERRORS)
    except Exception as e:  # noqa: BLE001
        raise DataError(f"LMDB metadata record is damaged ({e}); re-run 'wsld data pack' with --overwrite") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_NAME:
        raise DataError("LMDB metadata record is not a wsld-lmdb record")
    return meta


def open_lmdb_index(path: str | Path, *, require_complete: bool = True, reference_labels: str = "folders") -> LmdbIndex:
    """Inspect the LMDB at ``path`` (ours or the reference tool's) and return its index.

    ``require_complete``: refuse an interrupted wsld pack (training). ``reference_labels``: for
    reference LMDBs, "folders" labels samples by the sorted class folders of the datalist (the
    order of torchvision's pretrained teachers), "stored" uses the labels stored in the values.
    """
    path = Path(os.path.expanduser(str(path)))
    if not path.exists():
        raise DataError(f"LMDB not found: {path}")
    if not is_lmdb_dir(path):
        raise DataError(f"{path} is not an LMDB folder (no data.mdb in it)")
    env = shared_env(path)
    with reading(path, DAMAGED_HINT):
        with env.begin() as txn:
            meta = read_meta(txn)
            if meta is not None:
                return _wsld_index(path, txn, meta, require_complete)
        return _reference_index(path, env, reference_labels)


def _wsld_index(path: Path, txn, meta: dict, require_complete: bool) -> LmdbIndex:
    if int(meta.get("version", 0)) > FORMAT_VERSION:
        raise DataError(f"{path} was packed by a newer wsld (format version {meta.get('version')}); upgrade wsld")
    complete = txn.get(COMPLETE_KEY) is not None
    if require_complete and not complete:
        done = txn.get(PROGRESS_KEY)
        where = f" ({int(done)} of {meta.get('count')} images written)" if done is not None else ""
        raise DataError(f"LMDB {path} is an interrupted pack{where}: {REPACK_HINT}")
    labels = np.frombuffer(meta["labels"], dtype="<i4").astype(np.int64)
    if len(labels) != int(meta["count"]):
        raise DataError(f"LMDB {path}: metadata holds {len(labels)} labels for {meta['count']} samples")
    return LmdbIndex(path, "wsld", list(meta["classes"]), labels, meta=meta, complete=complete)


def read_datalist(path: Path) -> tuple[list[str], int]:
    """The distinct non-empty lines of a reference ``<split>_datalist`` in first-seen order, and how
    many repeats were dropped: the reference list maker appended, so a re-run listed every image
    twice, and each key names one LMDB record however often it is listed."""
    try:
        with open(path, encoding="utf-8", errors="surrogateescape") as f:
            lines = [line.rstrip("\r\n") for line in f]
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror or e}") from None
    lines = [line for line in lines if line.strip()]
    distinct = list(dict.fromkeys(lines))
    return distinct, len(lines) - len(distinct)


def read_stored_labels(env: lmdb.Environment, keys: StringTable) -> tuple[np.ndarray, list[int]]:
    """Reference format: the label of each sample from the last 2 bytes of its value.

    Only the value's last page is touched (zero-copy buffer), not the image. Missing keys get -1
    and are returned as the second element.
    """
    labels = np.full(len(keys), -1, dtype=np.int64)
    missing = []
    with env.begin(buffers=True) as txn:
        for i in range(len(keys)):
            v = txn.get(keys.raw(i))
            if v is None or len(v) < 3:
                missing.append(i)
                continue
            labels[i] = int.from_bytes(bytes(v[-2:]), "little")
    return labels, missing


def _reference_index(path: Path, env: lmdb.Environment, reference_labels: str) -> LmdbIndex:
    datalist = datalist_for(path)
    if datalist is None:
        raise DataError(
            f"LMDB {path} has no wsld metadata and no '{path.name}{DATALIST_SUFFIX}' beside it: it is neither a "
            "complete wsld pack nor a reference-tool LMDB (re-run 'wsld data pack' to make one)"
        )
    if reference_labels not in ("folders", "stored"):
        raise DataError(f"config key 'data.reference_labels': '{reference_labels}' is not one of folders, stored")
    lines, repeats = read_datalist(datalist)
    if not lines:
        raise DataError(f"{datalist} is empty")
    keys = StringTable(lines)
    folders = datalist_folders(lines)
    notes = []
    if repeats:
        notes.append(f"{datalist} lists {repeats} image(s) more than once (the reference tool's list maker appends "
                     f"when re-run); each of its {len(lines)} distinct images is read once")
    mode = reference_labels
    if mode == "folders" and any(f is None for f in folders):
        notes.append(f"{datalist.name} has lines without a class folder: using the labels stored in the values")
        mode = "stored"
    stored = None
    if mode == "folders":
        classes = sorted(set(folders))  # type: ignore[arg-type]
        index_of = {c: i for i, c in enumerate(classes)}
        labels = np.array([index_of[f] for f in folders], dtype=np.int64)
    else:
        stored, missing = read_stored_labels(env, keys)
        if missing:
            raise DataError(
                f"LMDB {path}: {len(missing)} key(s) of {datalist.name} are missing or empty, e.g. "
                f"'{lines[missing[0]]}' (line {missing[0] + 1})"
            )
        labels = stored
        classes = names_for_stored_labels(stored, folders)
    return LmdbIndex(path, "reference", classes, labels, keys=keys,
                     meta={"datalist": str(datalist), "datalist_repeats": repeats}, stored_labels=stored, notes=notes)


def datalist_folders(lines: list[str]) -> list[Optional[str]]:
    """The class folder of each datalist line (``classfolder/filename``), None for a line without one."""
    return [line.split("/", 1)[0] if "/" in line else None for line in lines]


def folder_order_mismatch(index: LmdbIndex) -> tuple[int, list[tuple[str, int, int]]]:
    """Reference LMDB labelled by sorted folders: the samples whose stored label differs, and
    ``(folder, stored, sorted)`` per differing class folder.

    Judged from each class folder's first sample (one value read per class, not one per image:
    the reference packer gave all images of a folder its folder's label).
    """
    first = np.unique(index.labels, return_index=True)[1]
    sizes = np.bincount(index.labels, minlength=len(index.classes))
    differ, n = [], 0
    with reading(index.path, DAMAGED_HINT), shared_env(index.path).begin(buffers=True) as txn:
        for i in first.tolist():
            v = txn.get(index.key(i))
            if v is None or len(v) < 3:
                continue  # a missing record: training reports it as corrupt
            stored, label = int.from_bytes(bytes(v[-2:]), "little"), int(index.labels[i])
            if stored != label:
                differ.append((index.classes[label], stored, label))
                n += int(sizes[label])
    return n, differ


def join_stored_labels(a: LmdbIndex, b: LmdbIndex) -> list[str]:
    """Class names for two reference LMDBs read with their stored labels (train and val).

    Each split may list its images in any order; what must agree is the label each class folder
    is stored with. A folder stored under different labels in the two splits is a DataError naming
    it (the reference tool labelled each split in its own directory-listing order).
    """
    per_split = []
    for idx in (a, b):
        folders = datalist_folders(list(idx.keys))
        labels: dict[str, set[int]] = {}
        for f, y in zip(folders, idx.labels.tolist()):
            if f is not None:
                labels.setdefault(f, set()).add(y)
        per_split.append((folders, labels))
    (fa, la), (fb, lb) = per_split
    for folder in sorted(la.keys() & lb.keys()):
        if la[folder] != lb[folder]:
            raise DataError(
                f"class folder '{folder}' is stored as label {_labels(la[folder])} in {a.path} but "
                f"{_labels(lb[folder])} in {b.path}: the reference tool labelled the two splits in different orders, "
                "so data.reference_labels=stored cannot use both; use data.reference_labels=folders (sorted folders, "
                "the same in both splits)"
            )
    return names_for_stored_labels(np.concatenate([a.labels, b.labels]), fa + fb)


def _labels(ys: set[int]) -> str:
    return "/".join(str(y) for y in sorted(ys))


def names_for_stored_labels(stored: np.ndarray, folders: list[Optional[str]]) -> list[str]:
    """Name label k after the class folder most of its samples come from (or "k" without folders)."""
    n = int(stored.max()) + 1 if len(stored) else 0
    votes: list[dict[str, int]] = [dict() for _ in range(n)]
    for y, f in zip(stored.tolist(), folders):
        if f is not None:
            votes[y][f] = votes[y].get(f, 0) + 1
    return [max(v, key=v.get) if v else str(k) for k, v in enumerate(votes)]  # type: ignore[arg-type]


class LmdbReader:
    """Reads one sample's bytes through this process's shared read-only environment.

    Nothing LMDB-related is stored on the object, so it pickles to DataLoader workers as plain
    data and each worker opens the LMDB itself on its first read (``shared_env``).
    """

    def __init__(self, index: LmdbIndex):
        self.index = index

    def _environment(self) -> lmdb.Environment:
        return shared_env(self.index.path)

    def read(self, i: int) -> tuple[bytes, Optional[str], Optional[int]]:
        """``(image bytes, stored path or None, stored label)``; raises RecordError for a bad record:
        missing, malformed, failing its checksum, or (wsld format) carrying another label than the
        metadata's list gives sample ``i`` (records moved between classes must not train under
        the wrong label). A damaged LMDB page is a DataError naming the file."""
        key = self.index.key(i)
        with reading(self.index.path, DAMAGED_HINT), self._environment().begin(buffers=True) as txn:
            value = txn.get(key)
            if value is None:
                raise RecordError(f"key {key.decode('utf-8', 'replace')!r} missing from the LMDB")
            if self.index.kind == "wsld":
                p, y, data = decode_record(value)
                if y != int(self.index.labels[i]):
                    raise RecordError(f"record label {y} disagrees with the metadata label {int(self.index.labels[i])} "
                                      "(records moved between classes?)")
                return data, p, y
            data, y = decode_reference_value(value)
            return data, None, y

    def describe(self, i: int) -> str:
        if self.index.kind == "reference":
            return f"{self.index.path}[{self.index.key(i).decode('utf-8', 'replace')}]"
        try:
            _, p, _ = self.read(i)
        except Exception:  # noqa: BLE001 - describe must not fail
            p = None
        return f"{self.index.path}[{i}]" + (f" {p}" if p else "")
