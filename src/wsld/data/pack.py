"""``wsld data pack``: one split of an image folder into one LMDB (format in ``lmdb_reader``).

Compared with the reference tool's packer this one stores each file's original bytes (no lossy,
slow decode and re-encode unless ``--resize-short`` asks for smaller images), labels by the sorted
class order, grows ``map_size`` on demand instead of reserving 1 TB, reads files on a thread pool
with a bounded look-ahead (memory does not grow with the dataset), and commits in transactions of
about 16 MiB that also record how many samples are done, so a run stopped by Ctrl-C or kill -9
resumes where its last commit ended (a transaction is held twice in memory, as Python bytes and as
LMDB's dirty pages, so its size sets the packer's peak: about 80 MiB resident at any dataset size). The completion marker is the last write; training refuses an
LMDB without it. A finished pack is never deleted or replaced without ``overwrite``.
"""

from __future__ import annotations

import hashlib
import io
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import lmdb
import msgpack
import numpy as np

from wsld.data.images import ImageDecodeError, load_pixels, open_image, to_rgb
from wsld.data.files import read_image_file, real_root
from wsld.data.lists import LIST_SUFFIX, ImageList, find_classes, present_splits, read_list, scan_split, split_of_list
from wsld.data.lmdb_reader import (
    COMPLETE_KEY,
    DAMAGED_HINT,
    NAME_ERRORS,
    FORMAT_NAME,
    FORMAT_VERSION,
    META_KEY,
    PROGRESS_KEY,
    encode_record,
    is_lmdb_dir,
    read_meta,
    record_key,
    release_env,
)
from wsld.data.lmdb_files import check_data_file, damaged, first_line, no_space, reading
from wsld.data.parallel import ordered_map
from wsld.errors import DataError
from wsld.out_folder import LOCK_NAME, take_folder

INITIAL_MAP_SIZE = 256 << 20
COMMIT_BYTES = 16 << 20  # 64 MiB measured 170 MiB peak RSS, 16 MiB 78 MiB, at the same speed
COMMIT_ITEMS = 2048
_LMDB_FILES = {"data.mdb", "lock.mdb"}


@dataclass
class PackResult:
    path: Path
    count: int
    written: int  # samples written by this run
    resumed_from: int  # 0 for a fresh pack
    seconds: float
    bytes_stored: int  # image bytes written by this run
    already_complete: bool = False
    reencoded: int = 0  # --resize-short: images made smaller
    undecodable: list[str] | None = None  # --resize-short: stored as-is because they could not be decoded


def default_output(root: str | Path, split: str, resize_short: Optional[int] = None) -> Path:
    """``ROOT/lmdb/<split>`` (``ROOT/lmdb/<split>_<S>`` with --resize-short S, the reference's naming)."""
    name = f"{split}_{resize_short}" if resize_short else split
    return Path(root) / "lmdb" / name


def resize_shorter_side(data: bytes, short: int, quality: int) -> tuple[bytes, bool]:
    """Decode, shrink so the shorter side is ``short`` (never enlarge), re-encode as RGB JPEG."""
    img = open_image(data)
    w, h = img.size
    if min(w, h) <= short:
        return data, False
    scale = short / min(w, h)
    new = (max(1, round(w * scale)), max(1, round(h * scale)))
    if img.format == "JPEG":
        img.draft("RGB", new)  # decode at the largest DCT scale that is still >= the target
    img = to_rgb(load_pixels(img)).resize(new, resample=3)  # bicubic, antialiased
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue(), True


def _open_for_write(path: Path, map_size: int) -> lmdb.Environment:
    if (path / "data.mdb").is_file():
        check_data_file(path, DAMAGED_HINT)  # a truncated file would be a SIGBUS once mapped
    try:
        return lmdb.open(str(path), map_size=map_size, subdir=True, readahead=False, meminit=False, max_dbs=0)
    except lmdb.Error as e:
        if no_space(e, path):
            raise DataError(f"cannot create LMDB {path}: the disk is full ({first_line(e)})") from None
        raise damaged(path, e, DAMAGED_HINT) from None


def _write_failed(path: Path, e: BaseException, written: int) -> DataError:
    why = "the disk is full" if no_space(e, path) else "a write failed"
    return DataError(f"cannot write LMDB {path}: {why} ({first_line(e)}); make room, then run the same command again: "
                     f"the {written} images written so far are kept and the pack resumes there")


def _remove_lmdb(path: Path) -> None:
    for name in _LMDB_FILES:
        (path / name).unlink(missing_ok=True)


def _prepare_output(path: Path, split: str, checksum: str, overwrite: bool, log) -> tuple[str, int]:
    """Decide what to do with what is at ``path``: ("fresh"|"resume"|"complete", samples done).

    A pack is the same when its split and list checksum are (two splits can list the same relative
    paths and labels). Only an unfinished pack of another list is replaced without ``overwrite``;
    a complete pack, a foreign LMDB or damaged metadata is refused with the way out. Nothing is
    touched before the decision, so a refused pack leaves the folder as it was.
    """
    if path.is_dir():
        others = sorted(n for n in os.listdir(path) if n not in _LMDB_FILES and n != LOCK_NAME)
        if others:
            raise DataError(f"--out {path} holds other files ({', '.join(others[:3])}); give an empty or new folder")
    if not is_lmdb_dir(path):
        return "fresh", 0
    release_env(path)  # a read-only handle from this process (LMDB allows one per path)
    if overwrite:  # replaced unread: a truncated or damaged LMDB is what --overwrite is for
        _remove_lmdb(path)
        return "fresh", 0
    env = _open_for_write(path, INITIAL_MAP_SIZE)
    try:
        with reading(path, DAMAGED_HINT), env.begin() as txn:
            try:
                meta, damaged = read_meta(txn), False
            except DataError:
                meta, damaged = None, True
            n_entries = txn.stat()["entries"]
            complete = txn.get(COMPLETE_KEY) is not None
            done = int(txn.get(PROGRESS_KEY) or 0)
    finally:
        env.close()
    keep = "give another --out, or --overwrite to replace it"
    if overwrite or (meta is None and not damaged and not n_entries):
        _remove_lmdb(path)
        return "fresh", 0
    if damaged:
        raise DataError(f"{path} holds a wsld LMDB whose metadata is damaged; {keep}")
    if meta is None:
        raise DataError(f"{path} holds an LMDB not written by wsld (a reference-tool pack?); wsld reads it as it is. "
                        f"{keep}")
    if meta.get("list_sha256") == checksum and meta.get("split") == split:
        return ("complete", int(meta["count"])) if complete else ("resume", done)
    if complete:
        size = f", --resize-short {meta['resize_short']}" if meta.get("resize_short") else ""
        raise DataError(
            f"{path} already holds a complete pack of another image list or options ({meta.get('count')} images of "
            f"split '{meta.get('split')}' from {meta.get('source')}{size}); {keep}"
        )
    log(f"{path}: an unfinished pack of a different image list or options; starting over")
    _remove_lmdb(path)
    return "fresh", 0


def pack_lmdb(
    root: str | Path,
    split: str,
    out: str | Path | None = None,
    *,
    workers: int = 8,
    resize_short: Optional[int] = None,
    quality: int = 95,
    list_file: str | Path | None = None,
    overwrite: bool = False,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
    commit_bytes: int = COMMIT_BYTES,
    commit_items: int = COMMIT_ITEMS,
    _on_commit: Callable[[int], None] | None = None,
) -> PackResult:
    """Pack ``root/split`` (or the images of ``list_file``, found in ``<its root>/split``) into ``out``.

    Resumes an interrupted pack of the same image list and options, and starts an interrupted
    pack of another list over. A complete pack of another list, an LMDB wsld did not write or
    damaged metadata is refused (DataError) unless ``overwrite``; so is any input that cannot be
    packed, before the output is touched. ``_on_commit(n_done)`` is a test hook called after each
    committed transaction.
    """
    log = log or (lambda msg: print(msg, file=sys.stderr))
    root = Path(os.path.expanduser(str(root)))
    if resize_short is not None and resize_short < 1:
        raise DataError(f"--resize-short must be >= 1, got {resize_short}")
    if not 1 <= quality <= 100:
        raise DataError(f"--quality must be in 1..100, got {quality}")
    out_path = Path(os.path.expanduser(str(out))) if out else default_output(root, split, resize_short)
    with take_folder(out_path, "LMDB"):  # before anything there is looked at: a second pack is refused at once
        return _pack(root, split, out_path, list_file, workers, resize_short, quality, overwrite, progress, log,
                     commit_bytes, commit_items, _on_commit)


def _pack(root: Path, split: str, out_path: Path, list_file, workers: int, resize_short: Optional[int], quality: int,
          overwrite: bool, progress: bool, log: Callable[[str], None], commit_bytes: int, commit_items: int,
          _on_commit: Callable[[int], None] | None) -> PackResult:
    """``pack_lmdb`` once ``out_path`` is locked."""
    lst = _image_list(root, split, list_file)
    options = {"resize_short": resize_short, "quality": quality if resize_short else None}
    checksum = hashlib.sha256((lst.checksum() + repr(sorted(options.items()))).encode()).hexdigest()
    state, done = _prepare_output(out_path, lst.split, checksum, overwrite, log)
    n = len(lst)
    if state == "complete":
        log(f"{out_path} is already a complete pack of these {n} images (use --overwrite to pack again)")
        return PackResult(out_path, n, 0, n, 0.0, 0, already_complete=True)
    start = done if state == "resume" else 0
    if start:
        log(f"{out_path}: resuming an interrupted pack at image {start} of {n}")

    existing = (out_path / "data.mdb").stat().st_size if (out_path / "data.mdb").exists() else 0
    env = _open_for_write(out_path, max(INITIAL_MAP_SIZE, 2 * existing))
    t0 = time.perf_counter()
    stats = {"bytes": 0, "reencoded": 0}
    undecodable: list[str] = []
    written = start

    def commit(records: list[tuple[bytes, bytes]], extra: dict[bytes, bytes]) -> None:
        while True:
            try:
                with env.begin(write=True) as txn:
                    for k, v in records:
                        txn.put(k, v)
                    for k, v in extra.items():
                        txn.put(k, v)
                return
            except lmdb.MapFullError:  # the aborted transaction is retried in a larger map
                env.set_mapsize(env.info()["map_size"] * 2)
            except lmdb.Error as e:  # a full disk: the transaction is dropped whole
                raise _write_failed(out_path, e, written) from None

    boundary = real_root(lst.split_dir.parent)

    def load(i: int) -> tuple[int, bytes, str]:
        path = lst.split_dir / lst.paths[i]
        try:
            data = read_image_file(path, boundary)
        except OSError as e:
            raise DataError(
                f"cannot read {path}: {e.strerror or e} (fix or remove it, re-run 'wsld data list' if used, "
                "then pack again: the images written so far are kept)"
            ) from None
        if resize_short:
            try:
                data, changed = resize_shorter_side(data, resize_short, quality)
                return i, data, "resized" if changed else "kept"
            except (ImageDecodeError, OSError):
                return i, data, "undecodable"  # stored as-is; training counts it as corrupt, verify reports it
        return i, data, "kept"

    bar = None
    try:
        if state == "fresh":
            meta = {
                "format": FORMAT_NAME, "version": FORMAT_VERSION, "split": lst.split, "classes": lst.classes,
                "count": n, "labels": np.asarray(lst.labels, dtype="<i4").tobytes(), "list_sha256": checksum,
                "resize_short": resize_short, "quality": options["quality"], "source": str(lst.split_dir),
                "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            }  # fmt: skip
            commit([], {META_KEY: msgpack.packb(meta, use_bin_type=True, unicode_errors=NAME_ERRORS), PROGRESS_KEY: b"0"})
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=n, initial=start, unit="img", desc=f"pack {lst.split}", dynamic_ncols=True,
                       mininterval=0.5, smoothing=0.05)
        chunk: list[tuple[bytes, bytes]] = []
        chunk_bytes = 0
        for i, data, status in ordered_map(load, range(start, n), workers):
            if status == "undecodable":
                undecodable.append(lst.paths[i])
            elif status == "resized":
                stats["reencoded"] += 1
            chunk.append((record_key(i), encode_record(lst.paths[i], lst.labels[i], data)))
            chunk_bytes += len(data)
            if chunk_bytes >= commit_bytes or len(chunk) >= commit_items:
                commit(chunk, {PROGRESS_KEY: str(i + 1).encode()})
                written, stats["bytes"] = i + 1, stats["bytes"] + chunk_bytes
                if bar is not None:
                    bar.update(len(chunk))
                chunk, chunk_bytes = [], 0
                if _on_commit is not None:
                    _on_commit(written)
        complete = msgpack.packb({"count": n, "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z")}, use_bin_type=True)
        commit(chunk, {PROGRESS_KEY: str(n).encode(), COMPLETE_KEY: complete})  # the marker goes last
        if bar is not None:
            bar.update(len(chunk))
        stats["bytes"] += chunk_bytes
        written = n
        try:
            env.sync(True)
        except lmdb.Error as e:
            raise _write_failed(out_path, e, written) from None
    except KeyboardInterrupt:
        log(f"\ninterrupted: {written} of {n} images are safely written; run the same command again to resume")
        raise
    finally:
        if bar is not None:
            bar.close()
        env.close()
    return PackResult(out_path, n, n - start, start, time.perf_counter() - t0, stats["bytes"],
                      reencoded=stats["reencoded"], undecodable=undecodable)


def _image_list(root: Path, split: str, list_file: str | Path | None) -> ImageList:
    """The images to pack, every input checked before the output is touched."""
    if list_file is not None:
        named = split_of_list(Path(list_file))
        if Path(list_file).name.endswith(LIST_SUFFIX) and named != split:
            raise DataError(f"--list {list_file} lists split '{named}' but --split is '{split}': give --split {named}")
        lst = read_list(list_file, split=split)
    else:
        if not root.is_dir():
            raise DataError(f"dataset root not found: {root}")
        splits = present_splits(root)
        if split not in splits:
            if not (root / split).is_dir():
                raise DataError(f"split folder not found: {root / split}")
            splits.append(split)
        classes = find_classes(root, splits)  # labels agree across splits even if only one is packed
        lst = scan_split(root, split, classes)
    if not len(lst):
        raise DataError(f"no images to pack in {lst.split_dir}")
    first = lst.split_dir / lst.paths[0]
    try:
        read_image_file(first, real_root(lst.split_dir.parent))
    except OSError as e:
        raise DataError(f"cannot read {first}, the first image to pack: {e.strerror or e}") from None
    return lst
