"""``wsld data verify``: fully decode every image of a folder, list file or LMDB and report.

Errors (the image is unusable; exit status 1): empty, unreadable, not an image, truncated,
corrupt data, decompression bomb, missing or malformed LMDB record, interrupted pack.
Notes (usable, converted in training; exit status unaffected): CMYK / grayscale / palette /
alpha / 16-bit images, a format that disagrees with the extension (PNG named ``.JPEG``), non-image
files that lists skip, and, for reference-tool LMDBs, stored labels that follow another class
order than the sorted class folders.
"""

from __future__ import annotations

import functools
import os
import struct
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional

import lmdb
import numpy as np

from wsld.data.files import read_image_file, real_root
from wsld.data.images import check_image
from wsld.data.lists import ImageList, LIST_SUFFIX, subdirs, present_splits, read_list, scan_dataset, scan_split
from wsld.data.lmdb_reader import (
    DAMAGED_HINT,
    PROGRESS_KEY,
    LmdbIndex,
    RecordError,
    names_for_stored_labels,
    decode_record,
    decode_reference_value,
    is_lmdb_dir,
    open_lmdb_index,
    shared_env,
)
from wsld.data.lmdb_files import SOFT_LABEL_STORE_KEY, first_line, reading, unseal
from wsld.data.parallel import ordered_map
from wsld.errors import DataError


@dataclass
class VerifyReport:
    """Result for one split / list / LMDB."""

    title: str
    classes: list[str]
    counts: list[int]
    unusable: list[int]
    errors: list[tuple[str, str]] = field(default_factory=list)
    notes: list[tuple[str, str]] = field(default_factory=list)
    remarks: list[str] = field(default_factory=list)  # dataset-level findings
    fatal: list[str] = field(default_factory=list)  # dataset-level errors (e.g. an interrupted pack)

    @property
    def total(self) -> int:
        return sum(self.counts)

    @property
    def ok(self) -> bool:
        return not self.errors and not self.fatal


# one item to check: (display name, label, a reader of the file or the bytes, or an error already known)
_Item = tuple[str, int, "Callable[[], bytes] | bytes | RecordError"]


def _check(item: _Item, check_ext: bool = True) -> tuple[str, int, Optional[str], list[str]]:
    name, label, src = item
    if isinstance(src, RecordError):
        return name, label, str(src), []
    if callable(src):
        try:
            data = src()
        except OSError as e:
            return name, label, f"unreadable ({e.strerror or e})", []
    else:
        data = src
    res = check_image(data, name if check_ext else "")
    return name, label, res.error, res.notes


def _run(report: VerifyReport, items: Iterable[_Item], n: int, workers: int, progress: bool,
         emit: Callable[[str], None], check_ext: bool = True) -> tuple[dict[int, int], dict[int, int]]:
    """Check every item; errors and notes go into ``report``; returns per-label (images, unusable)."""
    counts: dict[int, int] = {}
    bad: dict[int, int] = {}
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=n, unit="img", desc=f"verify {report.title.split(' ')[0]}", dynamic_ncols=True,
                   mininterval=0.5, file=sys.stderr)
    say = bar.write if bar is not None else emit
    try:
        for name, label, error, notes in ordered_map(functools.partial(_check, check_ext=check_ext), items, workers):
            counts[label] = counts.get(label, 0) + 1
            if error:
                report.errors.append((name, error))
                bad[label] = bad.get(label, 0) + 1
                say(f"ERROR {name}: {error}")
            for note in notes:
                report.notes.append((name, note))
                say(f"NOTE  {name}: {note}")
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    return counts, bad


def _fill_counts(report: VerifyReport, counts: dict[int, int], bad: dict[int, int]) -> VerifyReport:
    k = len(report.classes)
    report.counts = [counts.get(i, 0) for i in range(k)]
    report.unusable = [bad.get(i, 0) for i in range(k)]
    unlabeled = counts.get(-1, 0)
    if unlabeled:  # records whose label could not be read
        report.classes.append("(no label)")
        report.counts.append(unlabeled)
        report.unusable.append(bad.get(-1, 0))
    return report


def _new_report(title: str, classes: list[str]) -> VerifyReport:
    return VerifyReport(title, list(classes), [0] * len(classes), [0] * len(classes))


def verify_image_list(lst: ImageList, title: str, workers: int, progress: bool, emit) -> VerifyReport:
    report = _new_report(title, lst.classes)
    for p in lst.skipped:
        report.notes.append((f"{lst.split}/{p}", "not an image file (skipped by wsld data list)"))
        emit(f"NOTE  {lst.split}/{p}: not an image file (skipped by wsld data list)")
    root = real_root(lst.split_dir.parent)  # files are read only as regular files inside it
    items = ((f"{lst.split}/{p}", y, functools.partial(read_image_file, lst.split_dir / p, root))
             for p, y in zip(lst.paths, lst.labels))
    return _fill_counts(report, *_run(report, items, len(lst), workers, progress, emit))


def _get(txn, key: bytes):
    """A record's value, or a RecordError for a damaged page under it."""
    try:
        return txn.get(key)
    except lmdb.Error as e:
        return RecordError(f"damaged LMDB page ({first_line(e)})")


def _wsld_lmdb_items(index: LmdbIndex, n_written: int) -> Iterator[_Item]:
    env = shared_env(index.path)
    with env.begin() as txn:
        for i in range(n_written):
            label = int(index.labels[i])
            value = _get(txn, index.key(i))
            if isinstance(value, RecordError):
                yield f"[{i}]", label, value
                continue
            if value is None:
                yield f"[{i}]", label, RecordError("record missing from the LMDB")
                continue
            try:
                path, stored, data = decode_record(value)
            except RecordError as e:
                yield f"[{i}]", label, e
                continue
            if stored != label:
                yield path, label, RecordError(f"record label {stored} disagrees with the metadata label {label}")
                continue
            yield path, label, data


def _reference_items(index: LmdbIndex, stored: np.ndarray) -> Iterator[_Item]:
    env = shared_env(index.path)
    with env.begin() as txn:
        for i in range(len(index)):
            key = index.key(i)
            name = key.decode("utf-8", "surrogateescape")
            value = _get(txn, key)
            if isinstance(value, RecordError):
                yield name, -1, value
                continue
            if value is None:
                yield name, -1, RecordError("key from the datalist is missing from the LMDB")
                continue
            try:
                data, label = decode_reference_value(value)
            except RecordError as e:
                yield name, -1, e
                continue
            stored[i] = label
            yield name, label, data


def is_soft_label_store(path: Path) -> bool:
    """Whether the LMDB at ``path`` is a soft-label store (``wsld soft-labels``) rather than packed images."""
    with reading(path, DAMAGED_HINT), shared_env(path).begin() as txn:
        return txn.get(SOFT_LABEL_STORE_KEY) is not None


STORE_COMPLETE_KEY = b"__wsld_soft_labels_complete__"


def verify_store(path: Path, emit) -> VerifyReport:
    """A soft-label store's records (``wsld soft-labels``): every image present, every value of the
    length its metadata gives and (format 3) matching its CRC-32; the store is not images, so
    nothing is decoded."""
    import json

    with reading(path, DAMAGED_HINT), shared_env(path).begin() as txn:
        raw, done = txn.get(SOFT_LABEL_STORE_KEY), txn.get(STORE_COMPLETE_KEY)
        try:
            meta = json.loads(raw)
            count, crops, record_bytes = int(meta["count"]), int(meta["crops"]), int(meta["record_bytes"])
            sealed = int(meta.get("version", 0)) >= 3
        except (ValueError, KeyError, TypeError) as e:
            raise DataError(f"soft-label store {path}: its metadata record is damaged ({e}); remake it") from None
        report = VerifyReport(f"{path.name} (wsld soft-label store {path}, {crops} crop(s) per image)", ["images"],
                              [0], [0])
        unreadable = 0
        for i in range(count):
            key = struct.pack(">Q", i)
            value = _get(txn, key)
            error = None
            if isinstance(value, RecordError):
                error = str(value)
            elif value is None:
                error = "no record of this image"
            elif len(value) == 0:
                unreadable += 1
            else:
                payload = value
                if sealed:
                    try:
                        payload = unseal(value, key)
                    except ValueError as e:
                        error = f"records damaged ({e})"
                if error is None and len(payload) != crops * record_bytes:
                    error = f"records damaged ({len(payload)} bytes, not {crops} x {record_bytes})"
            report.counts[0] += 1
            if error:
                report.unusable[0] += 1
                report.errors.append((f"[{i}]", error))
                emit(f"ERROR {path}[{i}]: {error}")
    if done is None:
        report.fatal.append("incomplete store (no completion record): run 'wsld soft-labels' again to finish it")
        emit(f"ERROR {path}: {report.fatal[-1]}")
    if unreadable:
        report.remarks.append(f"{unreadable} image(s) were unreadable when the store was made (stored without crops)")
    if not sealed:
        report.remarks.append(f"format version {meta.get('version')}: records carry no checksum, only their length is checked")
    return report


def verify_lmdb(path: Path, workers: int, progress: bool, emit) -> VerifyReport:
    index = open_lmdb_index(path, require_complete=False, reference_labels="folders")
    if index.kind == "wsld":
        report = _new_report(f"{path.name} (wsld LMDB {path})", index.classes)
        n_written = len(index)
        if not index.complete:
            with shared_env(path).begin() as txn:
                n_written = min(len(index), int(txn.get(PROGRESS_KEY) or 0))
            msg = (f"interrupted pack: {n_written} of {len(index)} images written, no completion marker; "
                   "re-run 'wsld data pack' with the same arguments to finish it")
            report.fatal.append(msg)
            emit(f"ERROR {path}: {msg}")
        return _fill_counts(report, *_run(report, _wsld_lmdb_items(index, n_written), n_written, workers, progress,
                                          emit))

    # reference tool's LMDB: count per class from the labels stored in the values
    n = len(index)
    stored = np.full(n, -1, dtype=np.int64)
    report = _new_report(f"{path.name} (reference-tool LMDB {path}, order from {Path(index.meta['datalist']).name})",
                         [])
    # the reference packer re-encoded every image as JPEG: a JPEG "named .png" is expected there
    counts, bad = _run(report, _reference_items(index, stored), n, workers, progress, emit, check_ext=False)
    n_labels = max(counts) + 1 if counts else 0
    keys = [index.key(i).decode("utf-8", "surrogateescape") for i in range(n)]
    folders = [k.split("/", 1)[0] if "/" in k else None for k in keys]
    names = names_for_stored_labels(stored[stored >= 0], [f for f, y in zip(folders, stored) if y >= 0])
    names += [str(k) for k in range(len(names), n_labels)]
    report.classes = [f"{k} {names[k]}" if names[k] != str(k) else str(k) for k in range(n_labels)]
    _fill_counts(report, counts, bad)
    report.remarks.extend(_datalist_remarks(index))
    empty = [k for k in range(n_labels) if not counts.get(k)]
    if empty:
        report.remarks.append(f"{len(empty)} label(s) between 0 and {n_labels - 1} have no images, e.g. {empty[0]}")
    if all(f is not None for f in folders):  # do stored labels follow the sorted class folders (teachers' order)?
        folder_label = {c: i for i, c in enumerate(index.classes)}
        differ = sorted({f for y, f in zip(stored.tolist(), folders) if y >= 0 and folder_label[f] != y})
        if differ:
            ex = differ[0]
            ex_stored = next(y for y, f in zip(stored.tolist(), folders) if f == ex and y >= 0)
            report.remarks.append(
                f"stored labels follow another class order than the sorted class folders for {len(differ)} "
                f"class(es) (e.g. '{ex}' is stored as {ex_stored}, sorted order gives {folder_label[ex]}); training "
                "uses the sorted folders by default, matching torchvision's pretrained teachers; set "
                "data.reference_labels=stored for a teacher trained on the stored labels"
            )
        else:
            report.remarks.append("stored labels agree with the sorted class-folder order")
    return report


def _datalist_remarks(index: LmdbIndex) -> list[str]:
    """Datalist lines against LMDB entries: repeated lines (the reference list maker appends on
    re-run; training reads each image once) and records no line names (never read)."""
    with shared_env(index.path).begin() as txn:
        entries = txn.stat()["entries"]
    repeats = int(index.meta["datalist_repeats"])
    name = Path(index.meta["datalist"]).name
    out = []
    if repeats:
        out.append(f"{name} has {len(index) + repeats} lines for {entries} LMDB entries: {repeats} line(s) repeat an "
                   "earlier one (the reference tool's list maker appends when re-run); wsld reads each image once")
    if entries > len(index):
        out.append(f"the LMDB holds {entries - len(index)} record(s) that {name} does not list: they are never read")
    return out


def _print_report(report: VerifyReport, emit, counts: bool = True) -> None:
    if counts and report.classes:
        width = max(5, min(40, max(len(c) for c in report.classes)))
        emit(f"{'class':<{width}}  {'images':>8}  {'unusable':>8}")
        for c, n, b in zip(report.classes, report.counts, report.unusable):
            emit(f"{c:<{width}}  {n:>8}  {b:>8}")
    for r in report.remarks:
        emit(f"NOTE  {r}")
    n_err = len(report.errors)
    status = "OK" if report.ok else "UNUSABLE IMAGES FOUND" if n_err else "FAILED"
    emit(f"{report.title}: {report.total} images in {len(report.classes)} classes, {report.total - n_err} usable, "
         f"{n_err} unusable, {len(report.notes)} note(s): {status}")


def _is_list_file(path: Path) -> bool:
    return path.is_file() and (path.name.endswith(LIST_SUFFIX) or path.suffix == ".txt")


def verify_path(path: str | Path, *, workers: int = 4, progress: bool = True, counts: bool = True,
                emit: Callable[[str], None] | None = None) -> int:
    """Verify a dataset root, a split folder, a list file, an LMDB or a folder of LMDBs.

    Returns 0 when every image is usable, 1 otherwise. Bad input raises DataError (exit 2).
    """
    emit = emit or print
    path = Path(os.path.expanduser(str(path)))
    if not path.exists():
        raise DataError(f"path not found: {path}")
    reports: list[VerifyReport] = []

    def done(r: VerifyReport) -> None:
        _print_report(r, emit, counts)
        reports.append(r)

    if path.is_file():
        if not _is_list_file(path):
            raise DataError(f"{path} is a file but not a list (*_list.txt); give a folder, a list file or an LMDB")
        lst = read_list(path)
        done(verify_image_list(lst, f"{path.name}", workers, progress, emit))
    elif is_lmdb_dir(path):
        done(verify_store(path, emit) if is_soft_label_store(path) else verify_lmdb(path, workers, progress, emit))
    else:
        lmdbs = [path / d for d in subdirs(path) if is_lmdb_dir(path / d)]
        splits = [s for s in present_splits(path) if not is_lmdb_dir(path / s)]
        if lmdbs and not splits:
            for p in lmdbs:
                try:
                    done(verify_store(p, emit) if is_soft_label_store(p) else verify_lmdb(p, workers, progress, emit))
                except DataError as e:  # one damaged LMDB does not hide the state of the others
                    report = _new_report(f"{p.name} ({p})", [])
                    report.fatal.append(str(e))
                    emit(f"ERROR {p}: {e}")
                    done(report)
        elif splits:
            lists = scan_dataset(path, splits)
            for split, lst in lists.items():
                done(verify_image_list(lst, split, workers, progress, emit))
        else:  # a split folder of class folders
            classes = subdirs(path)
            if not classes:
                raise DataError(f"{path} has no class folders, split folders, list or LMDB to verify")
            lst = scan_split(path.parent, path.name, classes)
            done(verify_image_list(lst, path.name, workers, progress, emit))
    if len(reports) > 1:
        total = sum(r.total for r in reports)
        bad = sum(len(r.errors) for r in reports)
        emit(f"all: {total} images, {bad} unusable")
    return 0 if all(r.ok for r in reports) else 1
