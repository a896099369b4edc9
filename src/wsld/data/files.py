"""Image files on disk: only regular files inside the dataset root are ever opened.

A list entry is a name, and by the time it is read the name may be a symlink to ``/etc/passwd``,
a FIFO (an ``open`` that blocks for ever) or a link to ``/dev/zero`` (a read that never ends).
Listing refuses such entries (``wsld data list``, the folder scan); reading checks again, because
files change after listing, and raises ``UnsafeFileError`` (an ``OSError``, so every caller's
"cannot read" handling applies: training skips the image as corrupt, verify reports it, pack stops).
Symlinks that stay inside the dataset root (linked class folders) are followed as usual.
"""

from __future__ import annotations

import os
import re
import stat

_OPEN_FLAGS = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
# C0 controls, DEL, C1 controls: a TAB or newline in a name would split a list line in two
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f]")


class UnsafeFileError(OSError):
    """A listed image that is not a regular file inside the dataset root."""


def real_root(root: str | os.PathLike) -> str:
    """The dataset root with every symlink resolved: the boundary files must stay within."""
    return os.path.realpath(root)


def is_inside(real: str, root: str) -> bool:
    """True if the resolved path ``real`` is ``root`` or below it (both resolved)."""
    return real == root or real.startswith(root.rstrip(os.sep) + os.sep)


def file_kind(mode: int) -> str:
    """What a non-regular file is, for messages."""
    for test, name in ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"), (stat.S_ISDIR, "a folder")):
        if test(mode):
            return name
    return "not a regular file"


def control_character(name: str) -> str | None:
    """The first control character in ``name`` as ``U+XXXX``, or None."""
    m = _CONTROL.search(name)
    return f"U+{ord(m.group()):04X}" if m else None


def read_image_file(path: str | os.PathLike, root: str) -> bytes:
    """The bytes of ``path``, a regular file whose resolved path lies inside ``root`` (resolved).

    The type is checked with ``lstat`` before opening (opening a device can have side effects)
    and again on the open descriptor (the name may have been swapped in between); ``O_NOFOLLOW``
    and ``O_NONBLOCK`` make a swapped-in link fail and a swapped-in FIFO return at once.
    """
    real = os.path.realpath(path)
    if not is_inside(real, root):
        raise UnsafeFileError(f"symlink leads outside the dataset root {root} (to {real}); not read")
    mode = os.lstat(real).st_mode
    if not stat.S_ISREG(mode):
        raise UnsafeFileError(f"{file_kind(mode)}, not a regular file; not read")
    fd = os.open(real, _OPEN_FLAGS)
    with open(fd, "rb", closefd=True) as f:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise UnsafeFileError(f"{file_kind(mode)}, not a regular file; not read")
        return f.read()
