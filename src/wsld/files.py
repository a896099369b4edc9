"""Durable file writes: temp file, fsync, rename, so a file under its final name is always complete.

Files end with the mode ``open()`` would give them (0666 minus the umask), not the temp file's
0600, so a team sharing a run folder can read each other's runs.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path


def fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def current_umask() -> int:
    """The process umask, read without changing it where the system allows (Linux: /proc)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)  # elsewhere: set and restore at once
    os.umask(mask)
    return mask


def ordinary_file_mode() -> int:
    """What ``open(path, "w")`` would create: 0666 minus the umask."""
    return 0o666 & ~current_umask()


def atomic_write_bytes(path: str | Path, data: bytes, *, pause_s: float = 0.0) -> None:
    """Write ``data`` to ``path`` via temp file + fsync + rename.

    ``pause_s`` (tests only) sleeps with half of the data written to the temp file, so a test
    can kill the process in the middle of a write.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        if hasattr(os, "fchmod"):
            os.fchmod(fd, ordinary_file_mode())
        with os.fdopen(fd, "wb") as f:
            if pause_s > 0:
                half = len(data) // 2
                f.write(data[:half])
                f.flush()
                os.fsync(f.fileno())
                time.sleep(pause_s)
                data = data[half:]
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    fsync_dir(path.parent)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))
