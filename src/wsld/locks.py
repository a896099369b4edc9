"""Advisory OS file locks: one process at a time in a run directory or a teacher-cache entry, released by the kernel when the holder dies."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Callable, Optional

from wsld.errors import UserError

try:
    import fcntl
except ImportError:  # Windows: no flock; the locks are then no-ops (documented in docs/engine.md)
    fcntl = None  # type: ignore[assignment]

LOCK_NAME = ".lock"


class DirLock:
    """An exclusive ``flock`` on ``folder/.lock`` holding the holder's pid; the lock goes with the
    process, even on kill -9 (then the file stays, meaningless without a holder).

    ``remove_on_release``: a clean exit removes the file (a run directory is left as it was; a
    process that would have waited for this lock refuses instead, so none can hold the removed file).
    """

    def __init__(self, folder: Path, *, remove_on_release: bool = False):
        self.path = Path(folder) / LOCK_NAME
        self.fd: Optional[int] = None
        self.remove_on_release = remove_on_release

    def holder(self) -> str:
        try:
            return self.path.read_text(encoding="ascii").strip() or "unknown"
        except (OSError, UnicodeDecodeError):
            return "unknown"

    def try_acquire(self) -> bool:
        if fcntl is None:
            return True
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            return False
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode("ascii"))
        os.fsync(fd)
        self.fd = fd
        return True

    def in_use(self, what: str) -> UserError:
        return UserError(f"{what} is in use by another wsld process (pid {self.holder()}): wait for it to finish, or choose another folder")

    def acquire_or_refuse(self, what: str) -> None:
        if not self.try_acquire():
            raise self.in_use(what)

    def refuse_if_held(self, what: str) -> None:
        """Fail at once, creating nothing, when another live process holds this lock."""
        if fcntl is None or not self.path.is_file():
            return
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except OSError:
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            fcntl.flock(fd, fcntl.LOCK_UN)
        except OSError:
            raise self.in_use(what) from None
        finally:
            os.close(fd)

    def acquire_waiting(self, log: Callable[[str], None], what: str, poll_s: float = 1.0) -> None:
        """Block until the lock is free, saying once who holds it."""
        if self.try_acquire():
            return
        log(f"{what} is being prepared by another wsld process (pid {self.holder()}): waiting for it")
        while not self.try_acquire():
            time.sleep(poll_s)

    def release(self) -> None:
        if self.fd is not None:
            try:
                if self.remove_on_release:
                    try:
                        self.path.unlink()
                    except OSError:
                        pass
                fcntl.flock(self.fd, fcntl.LOCK_UN)  # type: ignore[union-attr]
            finally:
                os.close(self.fd)
                self.fd = None
