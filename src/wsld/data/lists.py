"""Image lists: scanning class folders, and the ``<split>_list.txt`` / ``classes.txt`` files.

Labels are the index of the class folder in sorted order over all splits, the order of
torchvision's ``ImageFolder`` (and so of torchvision's pretrained ImageNet teachers). Images
within a class come in ImageFolder's order too, so index ``i`` of a folder, list or LMDB dataset is
the same image as ``ImageFolder(...).samples[i]`` (less hidden files, which we skip).

List file format (UTF-8, one image per line, written by ``wsld data list``)::

    # wsld image list: path relative to the split folder <TAB> label (line index in classes.txt)
    # root: .
    n01440764/n01440764_10026.JPEG<TAB>0

Leading lines starting with ``# `` and holding no TAB are a header; ``# root:`` gives the dataset
root relative to the list's folder (``.`` when the list sits in the root), and images live in
``root/<split>/``. Image lines always hold a TAB, so a class or file named ``# notes`` or
``# root: x`` is an image line, never a comment. Readers also accept a space before the label
(hand-written lists; such a line must not start with ``# ``, or it reads as a comment). Paths are ``/``-separated, relative, and may hold
spaces or any Unicode character except control characters (TAB, LF, CR...): names holding one are
refused when listing, and lines holding one when reading, since they would name another image.
Listing also refuses symlinks leading outside the dataset root and image names that are not
regular files (FIFOs, devices); see ``files``.
"""

from __future__ import annotations

import hashlib
import os
import stat
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Optional, Sequence

from wsld.data.files import control_character, file_kind, is_inside, real_root
from wsld.data.images import is_hidden, is_image_name
from wsld.errors import DataError

KNOWN_SPLITS = ("train", "val", "validation", "valid", "test")
LIST_SUFFIX = "_list.txt"
CLASSES_FILE = "classes.txt"
_HEADER = "# wsld image list: path relative to the split folder <TAB> label (line index in classes.txt)"
_ROOT_PREFIX = "# root: "
_ENC = dict(encoding="utf-8", errors="surrogateescape")  # file names that are not valid UTF-8 round-trip


@dataclass
class ImageList:
    """One split's images: paths relative to ``split_dir``, labels indexing ``classes``."""

    split: str
    split_dir: Path
    classes: list[str]
    paths: list[str] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # non-image files met while scanning

    def __len__(self) -> int:
        return len(self.paths)

    def checksum(self) -> str:
        """SHA-256 of the class names and every (path, label) line, in order."""
        h = hashlib.sha256()
        h.update("\n".join(self.classes).encode("utf-8", "surrogateescape"))
        h.update(b"\0")
        for p, y in zip(self.paths, self.labels):
            h.update(f"{p}\t{y}\n".encode("utf-8", "surrogateescape"))
        return h.hexdigest()

    def counts(self) -> list[int]:
        out = [0] * len(self.classes)
        for y in self.labels:
            out[y] += 1
        return out


def subdirs(folder: Path) -> list[str]:
    try:
        return sorted(e.name for e in os.scandir(folder) if e.is_dir() and not is_hidden(e.name))
    except OSError as e:
        raise DataError(f"cannot list {folder}: {e.strerror or e}") from None


def present_splits(root: Path) -> list[str]:
    """The usual split folder names (train, val, validation, valid, test) found under ``root``."""
    return [s for s in KNOWN_SPLITS if (root / s).is_dir()]


def find_classes(root: str | Path, splits: Sequence[str]) -> list[str]:
    """Sorted class folder names; every split must have the same set (else a DataError naming it)."""
    root = Path(root)
    per_split: dict[str, list[str]] = {}
    for split in splits:
        d = root / split
        if not d.is_dir():
            raise DataError(f"split folder not found: {d}")
        classes = subdirs(d)
        if not classes:
            n_img = sum(1 for e in os.scandir(d) if e.is_file() and is_image_name(e.name))
            if n_img:
                raise DataError(
                    f"{d} holds {n_img} images but no class folders: put each image in a folder named after its "
                    f"class ({split}/<class>/<image>), as in train/ (ImageNet's val archive ships flat and needs sorting)"
                )
            raise DataError(f"{d} has no class folders (expected {split}/<class>/<images>)")
        per_split[split] = classes
    all_classes = sorted(set().union(*per_split.values()))
    for split, classes in per_split.items():
        missing = sorted(set(all_classes) - set(classes))
        if missing:
            other = next(s for s, c in per_split.items() if missing[0] in c)
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            raise DataError(
                f"class folder '{split}/{missing[0]}' is missing{more} but '{other}/{missing[0]}' exists: every split "
                "needs the same class folders so labels agree"
            )
    return all_classes


def scan_split(root: str | Path, split: str, classes: Sequence[str]) -> ImageList:
    """Walk ``root/split/<class>/`` in ImageFolder's order; hidden files skipped, non-images recorded.

    Refused with a DataError naming the path: a symlink loop, a symlink leading outside ``root``,
    an image name that is not a regular file (FIFO, device, socket), a name with a control character.
    """
    split_dir = Path(root) / split
    boundary = real_root(root)
    _refuse_outside(str(split_dir), os.path.realpath(split_dir), boundary, split_dir)
    out = ImageList(split, split_dir, list(classes))
    empty = []
    for label, cls in enumerate(classes):
        cls_dir = str(split_dir / cls)
        _refuse_control(cls_dir, split_dir)
        real = os.path.realpath(cls_dir)
        _refuse_outside(cls_dir, real, boundary, split_dir)
        n_before = len(out.paths)
        for dirpath, files in sorted(_walk(cls_dir, real, boundary, split_dir)):
            rel_dir = os.path.relpath(dirpath, split_dir).replace(os.sep, "/")
            for name in files:
                rel = f"{rel_dir}/{name}"
                if is_image_name(name):
                    out.paths.append(rel)
                    out.labels.append(label)
                else:
                    out.skipped.append(rel)
        if len(out.paths) == n_before:
            empty.append(cls)
    if empty:
        more = f" (and {len(empty) - 1} more: {', '.join(empty[1:4])}{'...' if len(empty) > 4 else ''})" if len(
            empty) > 1 else ""
        raise DataError(f"class folder '{split}/{empty[0]}' has no images{more}: remove it or add images")
    return out


def _walk(top: str, top_real: str, boundary: str, split_dir: Path) -> list[tuple[str, list[str]]]:
    """``(folder, sorted visible file names)`` for ``top`` and every visible folder below it.

    ``os.walk(followlinks=True)`` with the entry types kept: each name is checked from the type
    ``scandir`` already read, so only symlinks cost an extra system call.
    """
    found = []
    pending = [(top, (top_real,))]  # a folder and the real folders from the class folder down to it
    while pending:
        folder, chain = pending.pop()
        try:
            with os.scandir(folder) as it:
                entries = [e for e in it if not is_hidden(e.name)]
        except OSError as e:
            raise DataError(f"cannot read folder {folder}: {e.strerror or e}") from None
        files = []
        for e in sorted(entries, key=lambda e: e.name):
            if e.is_dir():
                _refuse_control(e.path, split_dir)
                if e.is_symlink():
                    real = os.path.realpath(e.path)
                    if any(is_inside(r, real) for r in chain):  # walked until the OS gives up, other classes too
                        raise DataError(f"symlink loop: {_where(e.path, split_dir)} points to {real}, a folder above "
                                        "it; remove the link")
                    _refuse_outside(e.path, real, boundary, split_dir)
                else:
                    real = os.path.join(chain[-1], e.name)
                pending.append((e.path, chain + (real,)))
                continue
            if is_image_name(e.name):
                _refuse_control(e.path, split_dir)
                _refuse_special(e, boundary, split_dir)
            files.append(e.name)
        found.append((folder, files))
    return found


def _where(path: str, split_dir: Path) -> str:
    return os.path.relpath(path, split_dir.parent)


def _refuse_control(path: str, split_dir: Path) -> None:
    """A TAB or newline in a name would make a list line name two images, or none."""
    char = control_character(os.path.basename(path))
    if char:
        raise DataError(f"{_where(path, split_dir)!r}: the name holds a control character ({char}), which lists "
                        "cannot hold; rename it")


def _refuse_outside(path: str, real: str, boundary: str, split_dir: Path) -> None:
    if not is_inside(real, boundary):
        raise DataError(f"symlink {_where(path, split_dir)} leads outside the dataset root {boundary} (to {real}): "
                        "wsld reads only files inside the root; copy the files in, or remove the link")


def _refuse_special(entry: os.DirEntry, boundary: str, split_dir: Path) -> None:
    """An image name must be a regular file inside the root (a FIFO would block every reader)."""
    if entry.is_symlink():
        real = os.path.realpath(entry.path)
        _refuse_outside(entry.path, real, boundary, split_dir)
        try:
            mode = os.lstat(real).st_mode
        except OSError:
            return  # a dangling link: listed, then reported as unreadable like any missing file
    elif entry.is_file(follow_symlinks=False):  # the type scandir read: no system call
        return
    else:
        mode = entry.stat(follow_symlinks=False).st_mode
    if not stat.S_ISREG(mode):
        raise DataError(f"{_where(entry.path, split_dir)} is {file_kind(mode)}, not an image file: remove it")


def scan_dataset(root: str | Path, splits: Optional[Sequence[str]] = None) -> dict[str, ImageList]:
    """Scan several splits with one shared class list (all splits must agree on the classes)."""
    root = Path(os.path.expanduser(str(root)))
    if not root.is_dir():
        raise DataError(f"dataset root not found: {root}")
    if not splits:
        splits = present_splits(root)
        if not splits:
            found = ", ".join(subdirs(root)[:8]) or "nothing"
            raise DataError(
                f"no split folder ({', '.join(KNOWN_SPLITS)}) under {root} (found: {found}); "
                "name the splits with --splits, e.g. --splits train,val"
            )
    classes = find_classes(root, splits)
    return {s: scan_split(root, s, classes) for s in splits}


def _atomic_write(path: Path, lines: Iterable[str]) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "w", newline="\n", **_ENC) as f:
            for line in lines:
                f.write(line)
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise DataError(f"cannot write {path}: {e.strerror or e}") from None


def write_lists(root: str | Path, out: str | Path | None = None, splits: Optional[Sequence[str]] = None,
                log=None) -> dict[str, ImageList]:
    """Write ``<split>_list.txt`` for each split and ``classes.txt`` into ``out`` (default ``root``).

    Files are replaced atomically, so re-running never appends or leaves a half-written list.
    """
    log = log or (lambda msg: print(msg, file=sys.stderr))
    root = Path(os.path.expanduser(str(root)))
    out_dir = Path(os.path.expanduser(str(out))) if out else root
    lists = scan_dataset(root, splits)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataError(f"cannot create {out_dir}: {e.strerror or e}") from None
    rel_root = os.path.relpath(root.resolve(), out_dir.resolve())
    char = control_character(rel_root)
    if char:
        raise DataError(f"the path from {out_dir} to the dataset root {root} holds a control character ({char}), which "
                        "a list's '# root:' line cannot hold; write the lists elsewhere (--out) or rename the folder")
    classes = next(iter(lists.values())).classes
    _atomic_write(out_dir / CLASSES_FILE, (f"{c}\n" for c in classes))
    for split, lst in lists.items():
        header = [f"{_HEADER}\n", f"{_ROOT_PREFIX}{rel_root}\n"]
        body = (f"{p}\t{y}\n" for p, y in zip(lst.paths, lst.labels))
        _atomic_write(out_dir / f"{split}{LIST_SUFFIX}", _chain(header, body))
        if lst.skipped:
            shown = ", ".join(f"{split}/{p}" for p in lst.skipped[:5])
            more = f" and {len(lst.skipped) - 5} more" if len(lst.skipped) > 5 else ""
            log(f"{split}: skipped {len(lst.skipped)} non-image file(s): {shown}{more}")
    return lists


def _chain(*parts):
    for p in parts:
        yield from p


def read_classes(path: str | Path) -> list[str]:
    path = Path(path)
    try:
        with open(path, newline="\n", **_ENC) as f:
            names = [_line_text(line) for line in f]
    except FileNotFoundError:
        raise DataError(f"class list not found: {path} (run 'wsld data list ROOT' to write it)") from None
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror or e}") from None
    for i, n in enumerate(names):
        _refuse_control_line(n, f"{path}:{i + 1}")
    while names and not names[-1].strip():
        names.pop()
    for i, n in enumerate(names):
        if not n.strip():
            raise DataError(f"{path}:{i + 1}: empty class name")
    seen: dict[str, int] = {}
    for i, n in enumerate(names):
        if n in seen:
            raise DataError(f"{path}:{i + 1}: class '{n}' repeats line {seen[n] + 1}")
        seen[n] = i
    if not names:
        raise DataError(f"{path} lists no classes")
    return names


def split_of_list(path: Path) -> str:
    name = path.name
    return name[: -len(LIST_SUFFIX)] if name.endswith(LIST_SUFFIX) else path.stem


def read_list(list_path: str | Path, classes_path: str | Path | None = None, split: Optional[str] = None) -> ImageList:
    """Read a list file (see module doc) with the ``classes.txt`` beside it; every line is checked.

    Images live in ``<root>/<split>/``, ``split`` taken from the name ``<split>_list.txt`` unless
    given. A line with a bad label (not an integer, or outside ``0..len(classes)-1``), an absolute
    path, a path leading outside the dataset root, or a control character that ``write_lists``
    never writes (a file name holding a TAB or a newline would name another image) is a DataError
    naming ``file:line``; so is a missing split folder.
    """
    list_path = Path(os.path.expanduser(str(list_path)))
    if not list_path.is_file():
        raise DataError(f"list file not found: {list_path} (run 'wsld data list ROOT' to write it)")
    classes = read_classes(classes_path or list_path.parent / CLASSES_FILE)
    split = split or split_of_list(list_path)
    root = list_path.parent
    paths: list[str] = []
    labels: list[int] = []
    n_classes = len(classes)
    try:
        f = open(list_path, newline="\n", **_ENC)  # only LF ends a line: a CR inside a name is refused, not split on
    except FileNotFoundError:
        raise DataError(f"list file not found: {list_path} (run 'wsld data list ROOT' to write it)") from None
    except OSError as e:
        raise DataError(f"cannot read {list_path}: {e.strerror or e}") from None
    with f:
        in_header = True
        for lineno, raw in enumerate(f, 1):
            line = _line_text(raw)
            if in_header and line.startswith("# ") and "\t" not in line:  # an image line always holds a TAB
                if line.startswith(_ROOT_PREFIX):
                    root = list_path.parent / line[len(_ROOT_PREFIX):]
                continue
            if in_header:
                in_header = False
                root_s = os.path.normpath(root)
                split_s = os.path.join(root_s, split)
            if not line.strip():
                continue
            sep = "\t" if "\t" in line else " "
            parts = line.rsplit(sep, 1)
            where = f"{list_path}:{lineno}"
            _refuse_control_line("".join(parts), where)
            if len(parts) != 2 or not parts[0]:
                raise DataError(f"{where}: expected 'path<TAB>label', got '{line[:80]}'")
            rel, lab = (parts[0] if sep == "\t" else parts[0].rstrip()), parts[1].strip()
            try:
                y = int(lab)
            except ValueError:
                raise DataError(f"{where}: label '{lab[:20]}' is not an integer") from None
            if not 0 <= y < n_classes:
                raise DataError(f"{where}: label {y} is outside 0..{n_classes - 1} ({n_classes} classes in classes.txt)")
            if _escapes(rel, split_s, root_s):
                raise DataError(f"{where}: path '{rel}' points outside the dataset root {root_s}")
            paths.append(rel)
            labels.append(y)
    split_dir = Path(os.path.normpath(root)) / split
    if not split_dir.is_dir():
        raise DataError(f"{list_path}: its images would be in {split_dir}, which is not a folder (a list's images live "
                        "in <root>/<split>/, <root> from its '# root:' line, <split> from its name <split>_list.txt)")
    return ImageList(split, split_dir, classes, paths, labels)


def _line_text(raw: str) -> str:
    """A line without its LF, or CR LF (a list edited on Windows)."""
    line = raw[:-1] if raw.endswith("\n") else raw
    return line[:-1] if line.endswith("\r") else line


def _refuse_control_line(text: str, where: str) -> None:
    char = control_character(text)
    if char:
        raise DataError(f"{where}: control character {char} in the line, which 'wsld data list' never writes (a file "
                        "name holding a TAB or newline would name another image); fix the line or rename the file")


def _escapes(rel: str, split_dir: str, root: str) -> bool:
    """True for absolute paths and ``..`` that climb out of the dataset root (checked lexically)."""
    if os.path.isabs(rel) or rel.startswith(("/", "\\")):
        return True
    if ".." not in rel:
        return False
    full = os.path.normpath(os.path.join(split_dir, rel))
    return os.path.commonpath([root, full]) != root
