"""What a file is, in words, from its first bytes: for messages about a file given in the wrong place.

``wsld eval model.onnx`` should say "an ONNX model (an export)", not quote a zip library's error.
Only the first bytes (and, for zip archives, the member names) are read; nothing is unpickled.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

_MAGIC = [
    (b"\x93NUMPY", "a NumPy array file (.npy)"),
    (b"\x89HDF", "an HDF5 file (Keras/h5py weights?)"),
    (b"\x89PNG", "a PNG image"),
    (b"\xff\xd8\xff", "a JPEG image"),
    (b"\x1f\x8b", "a gzip file"),
    (b"PK\x03\x04", "a zip archive"),
]


def _zip_kind(path: Path) -> str:
    try:
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
    except (zipfile.BadZipFile, OSError, ValueError):
        return "a damaged zip archive"
    tops = {n.split("/", 1)[0] for n in names if "/" in n}
    if len(tops) == 1 and any(n.endswith("/constants.pkl") for n in names) and any("/code/" in n for n in names):
        return "a TorchScript archive (an export: load it with torch.jit.load)"
    if len(tops) == 1 and any(n.endswith("/data.pkl") for n in names):
        return "a PyTorch file"
    if names and all(n.endswith(".npy") for n in names):
        return "a NumPy archive (.npz)"
    return "a zip archive that is not a PyTorch file"


def describe_file(path: str | Path) -> str:
    """A short noun phrase for what ``path`` holds: 'an empty file', 'a text file', 'a PyTorch file', ..."""
    p = Path(path)
    if p.is_dir():
        return "a folder"
    try:
        with open(p, "rb") as f:
            head = f.read(4096)
    except OSError as e:
        return f"an unreadable file ({e.strerror or type(e).__name__})"
    if not head:
        return "an empty file"
    if head.startswith(b"PK\x03\x04") or head.startswith(b"PK\x05\x06"):
        return _zip_kind(p)
    for magic, kind in _MAGIC:
        if head.startswith(magic):
            return kind
    if len(head) >= 8 and int.from_bytes(head[:8], "little") < len(head) + (1 << 24) and head[8:9] == b"{":
        return "a safetensors file (weights only)"
    if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        return "a Python pickle (a legacy torch.save file or another tool's, not a zip-format PyTorch file)"
    if p.suffix.lower() == ".onnx":
        return "an ONNX model (an export, not a checkpoint)"
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError as e:
        if e.start < len(head) - 3:  # not just a character cut by the 4 KiB read
            return "a binary file of an unknown kind"
        text = head[: e.start].decode("utf-8")
    if all(c.isprintable() or c in "\r\n\t" for c in text):
        return "a text file"
    return "a binary file of an unknown kind"
