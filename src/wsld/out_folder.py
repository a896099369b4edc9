"""Output folders of ``wsld data pack`` and ``wsld soft-labels``: locked before anything in them is looked at.

A second process given the same ``--out`` is refused at once with the holder's pid, instead of
checking the folder before the first has written to it and then deleting the first's files.
Folders created only to hold the lock are removed again when the command writes nothing there.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from wsld.errors import UserError
from wsld.locks import LOCK_NAME, DirLock

__all__ = ["LOCK_NAME", "TakenFolder", "take_folder"]


class TakenFolder:
    """The lock on ``path`` and the folders this process created to hold it (outermost first)."""

    def __init__(self, path: Path, lock: DirLock, created: list[Path]):
        self.path, self.lock, self.created = path, lock, created

    def release(self) -> None:
        """Unlock; the folders created for the lock go again if nothing was written to them."""
        self.lock.release()
        for folder in reversed(self.created):
            try:
                folder.rmdir()  # only when empty
            except OSError:
                break

    def __enter__(self) -> "TakenFolder":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def take_folder(path: Path, what: str, option: str = "--out") -> TakenFolder:
    """Create ``path`` (and missing parents) if needed and lock it, or refuse with one line."""
    if path.exists() and not path.is_dir():
        raise UserError(f"{option} {path} exists and is not a folder: give a folder path")
    created: list[Path] = []
    probe: Optional[Path] = path
    while probe is not None and not probe.exists():
        created.insert(0, probe)
        probe = probe.parent if probe.parent != probe else None
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create {option} {path}: {e.strerror or e}") from None
    lock = DirLock(path, remove_on_release=True)
    taken = TakenFolder(path, lock, created)
    try:
        ok = lock.try_acquire()
    except OSError as e:
        taken.release()
        raise UserError(f"cannot lock {option} {path}: {e.strerror or e}") from None
    if not ok:
        error = lock.in_use(f"{what} {path}")
        taken.release()
        raise error
    return taken
