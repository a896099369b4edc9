"""An LMDB's files checked before they are mapped, and LMDB errors turned into one line naming the file.

LMDB maps ``data.mdb`` into memory and trusts it: a page past the end of a truncated file (a copy
that ran out of space, a partial download) is a SIGBUS that kills the process with no message.
So the file is first checked against the size its newest meta page records (last used page x
page size), read with plain ``read()`` calls, and damage found later by LMDB itself
(``MDB_CORRUPTED``, ``MDB_PAGE_NOTFOUND``, ...) becomes a ``DataError`` naming the file and what to do.
"""

from __future__ import annotations

import contextlib
import os
import struct
import zlib
from pathlib import Path
from typing import Iterator

import lmdb

from wsld.errors import DataError

DATA_FILE = "data.mdb"
_MAGIC = 0xBEEFC0DE
_META_OFFSET = 16  # page header: page number (8), pad (2), flags (2), lower/upper (4)
# MDB_meta on 64-bit builds: magic u32, version u32, address, mapsize, two MDB_db of 48 bytes
# (the first one's md_pad holds the page size), last page number, transaction id
_META = struct.Struct("<IIQQI44x48xQQ")
_SMALLEST_PAGE = 512


def _meta_at(head: bytes, offset: int):
    """(page size, last page, txn id) of the meta page at ``offset``, or None if it is not one."""
    start = offset + _META_OFFSET
    if len(head) < start + _META.size:
        return None
    magic, version, _addr, _mapsize, psize, last_pg, txnid = _META.unpack_from(head, start)
    if magic != _MAGIC or psize < _SMALLEST_PAGE or psize & (psize - 1):
        return None
    return psize, last_pg, txnid


def check_data_file(folder: str | Path, remedy: str) -> None:
    """Refuse ``folder/data.mdb`` when it is shorter than its own meta pages say (truncated), before
    anything maps it. A header this check cannot read is left to LMDB, which reads it with ``read()``
    and reports a bad one as an error (made one line by ``damaged``)."""
    path = Path(folder) / DATA_FILE
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            head = f.read(_META_OFFSET + _META.size)
            first = _meta_at(head, 0)
            second = None
            if first is not None:
                f.seek(first[0])
                second = _meta_at(f.read(_META_OFFSET + _META.size), 0)
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror or e}") from None
    metas = [m for m in (first, second) if m is not None]
    if not metas:  # no header this check can read (another word size or byte order): LMDB reads it itself
        return
    psize, last_pg, _ = max(metas, key=lambda m: m[2])
    needed = max(2, last_pg + 1) * psize
    if size < needed:
        raise DataError(
            f"{path} is truncated: {size} bytes on disk, its header records {needed} (an interrupted copy or download, "
            f"or a full disk?): {remedy}"
        )


def first_line(e: BaseException) -> str:
    text = str(e).strip()
    return (text.splitlines()[0] if text else type(e).__name__)[:200]


def damaged(folder: str | Path, e: BaseException, remedy: str) -> DataError:
    """The one line for an ``lmdb.Error`` met while reading ``folder``."""
    return DataError(f"LMDB {folder} is damaged ({first_line(e)}): {remedy}")


@contextlib.contextmanager
def reading(folder: str | Path, remedy: str) -> Iterator[None]:
    """Turn an ``lmdb.Error`` raised inside into ``damaged(folder, ...)``."""
    try:
        yield
    except lmdb.Error as e:
        raise damaged(folder, e, remedy) from None


def no_space(e: BaseException, folder: str | Path | None = None) -> bool:
    """Whether a failed write (an ``lmdb.Error`` or ``OSError``) ran out of disk: the error says so, or
    (LMDB reports a short write as EIO) the disk holding ``folder`` has less than 16 MiB left."""
    import errno
    import shutil

    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(e)
    if "No space left" in text or "Disk quota exceeded" in text:
        return True
    if folder is None:
        return False
    try:
        return shutil.disk_usage(folder).free < (16 << 20)
    except OSError:
        return False


# the key a wsld soft-label store (``wsld.soft_labels.store``) keeps its metadata under, so that the
# data tools can tell a store from a packed split without reading the store's format
SOFT_LABEL_STORE_KEY = b"__wsld_soft_labels_meta__"
_CRC = struct.Struct("<I")


def seal(payload: bytes, key: bytes = b"") -> bytes:
    """``payload`` followed by the CRC-32 (little-endian) of ``key`` and ``payload``: a flipped byte, or
    a value read under another key (a damaged index page), is found on read."""
    return payload + _CRC.pack(zlib.crc32(payload, zlib.crc32(key)))


def unseal(value: bytes, key: bytes = b"") -> bytes:
    """The payload of a ``seal``-ed value; ValueError when its checksum does not match."""
    if len(value) < _CRC.size:
        raise ValueError(f"{len(value)} bytes, shorter than a checksum")
    payload = bytes(value[: -_CRC.size])
    if _CRC.unpack(bytes(value[-_CRC.size :]))[0] != zlib.crc32(payload, zlib.crc32(key)):
        raise ValueError("checksum mismatch")
    return payload
