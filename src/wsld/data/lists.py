"""Image lists: scanning class folders, and the ``<split>_list.txt`` / ``classes.txt`` files.

Labels are the index of the class folder in sorted order over all splits, the order of
torchvision's ``ImageFolder`` (and so of torchvision's pretrained ImageNet teachers). Images
within a class come in ImageFolder's order too, so index ``i`` of a folder, list or LMDB dataset is
the same image as ``ImageFolder(...).samples[i]`` (less hidden files, which we skip).

List file format (UTF-8, one image per line, written by ``wsld data list``)::

    # wsld image list: path relative to the split folder <TAB> label (line index in classes.txt)
    # root: .
    n01440764/n01440764_10026.JPEG<TAB>0

Leading lines starting with ``# `` are a header; ``# root:`` gives the dataset root relative to
the list's folder (``.`` when the list sits in the root), and images live in ``root/<split>/``.
Readers also accept a space before the label. Paths are ``/``-separated, relative, and may hold
spaces or any Unicode character.
"""

from __future__ import annotations

import hashlib
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Optional, Sequence

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
    """Walk ``root/split/<class>/`` in ImageFolder's order; hidden files skipped, non-images recorded."""
    split_dir = Path(root) / split
    out = ImageList(split, split_dir, list(classes))
    empty = []
    for label, cls in enumerate(classes):
        cls_dir = split_dir / cls
        walked = []
        chains = {str(cls_dir): (os.path.realpath(cls_dir),)}  # real folders from the class folder down
        for dirpath, dirnames, filenames in os.walk(cls_dir, followlinks=True, onerror=_raise_walk_error):
            dirnames[:] = [d for d in dirnames if not is_hidden(d)]
            for d in dirnames:
                _refuse_symlink_loop(dirpath, d, chains, split_dir)
            walked.append((dirpath, filenames))
        n_before = len(out.paths)
        for dirpath, filenames in sorted(walked):
            rel_dir = os.path.relpath(dirpath, split_dir).replace(os.sep, "/")
            for name in sorted(filenames):
                if is_hidden(name):
                    continue
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


def _refuse_symlink_loop(dirpath: str, name: str, chains: dict, split_dir: Path) -> None:
    """A linked folder that leads back to one of its own ancestors would be walked until the OS
    gives up, listing the images of every folder on the way (other classes too) under this label."""
    child = os.path.join(dirpath, name)
    real = os.path.realpath(child)
    chain = chains[dirpath]
    if os.path.islink(child) and any(r == real or r.startswith(real.rstrip(os.sep) + os.sep) for r in chain):
        rel = os.path.relpath(child, split_dir.parent)
        raise DataError(f"symlink loop: {rel} points to {real}, a folder above it; remove the link")
    chains[child] = chain + (real,)


def _raise_walk_error(e: OSError) -> None:
    raise DataError(f"cannot read folder {e.filename}: {e.strerror or e}")


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
        with open(path, **_ENC) as f:
            names = [line.rstrip("\r\n") for line in f]
    except FileNotFoundError:
        raise DataError(f"class list not found: {path} (run 'wsld data list ROOT' to write it)") from None
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror or e}") from None
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


def read_list(list_path: str | Path, classes_path: str | Path | None = None) -> ImageList:
    """Read a list file (see module doc) with the ``classes.txt`` beside it; every line is checked.

    A line with a bad label (not an integer, or outside ``0..len(classes)-1``), an absolute path, or
    a path leading outside the dataset root is a DataError naming ``file:line``.
    """
    list_path = Path(os.path.expanduser(str(list_path)))
    if not list_path.is_file():
        raise DataError(f"list file not found: {list_path} (run 'wsld data list ROOT' to write it)")
    classes = read_classes(classes_path or list_path.parent / CLASSES_FILE)
    split = split_of_list(list_path)
    root = list_path.parent
    paths: list[str] = []
    labels: list[int] = []
    n_classes = len(classes)
    try:
        f = open(list_path, **_ENC)
    except FileNotFoundError:
        raise DataError(f"list file not found: {list_path} (run 'wsld data list ROOT' to write it)") from None
    except OSError as e:
        raise DataError(f"cannot read {list_path}: {e.strerror or e}") from None
    with f:
        in_header = True
        for lineno, raw in enumerate(f, 1):
            line = raw.rstrip("\r\n")
            if in_header and line.startswith("# "):
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
    return ImageList(split, Path(os.path.normpath(root)) / split, classes, paths, labels)


def _escapes(rel: str, split_dir: str, root: str) -> bool:
    """True for absolute paths and ``..`` that climb out of the dataset root (checked lexically)."""
    if os.path.isabs(rel) or rel.startswith(("/", "\\")):
        return True
    if ".." not in rel:
        return False
    full = os.path.normpath(os.path.join(split_dir, rel))
    return os.path.commonpath([root, full]) != root
