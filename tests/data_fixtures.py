"""A tiny ImageNet-shaped tree of real photos for the data tests (shared by tests/test_data_*.py).

Crops of scikit-learn's two sample photos, re-encoded, plus every awkward case users bring:
grayscale and CMYK JPEGs, an uppercase ``.JPEG``, a PNG named ``.JPEG``, a truncated file, a text
file with an image extension, a non-image file, a hidden file, a name with spaces, a non-ASCII
name, a nested sub-folder, and class names whose sorted order differs from creation order.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import msgpack
import numpy as np
import pytest
from PIL import Image

from wsld.cli import main

CLASSES = ["Zebra", "apple", "n01"]  # sorted(): uppercase before lowercase, as ImageFolder


@dataclass
class Tree:
    root: Path
    classes: list[str]
    expected_train: list[str]  # relative to train/, in ImageFolder order (hidden files excluded)
    expected_val: list[str]
    unusable: set[str]  # train paths verify must reject
    notes: set[str]  # train paths verify must note


_photos: list[np.ndarray] = []


def photo(i: int, w: int = 120, h: int = 90) -> Image.Image:
    """A crop of a real photo, different for each ``i``."""
    if not _photos:
        from sklearn.datasets import load_sample_images

        _photos.extend(load_sample_images().images)  # two 427x640 RGB photos
    src = _photos[i % 2]
    rng = np.random.default_rng(i)
    y = int(rng.integers(0, src.shape[0] - h))
    x = int(rng.integers(0, src.shape[1] - w))
    return Image.fromarray(np.ascontiguousarray(src[y : y + h, x : x + w]))


def encode(img: Image.Image, fmt: str = "JPEG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def make_tree(root: Path) -> Tree:
    files: dict[str, bytes] = {}
    k = 0

    def jpeg(i, **kw):
        return encode(photo(i, *(kw.pop("size", (120, 90)))), "JPEG", quality=90, **kw)

    # train
    files["train/Zebra/z1.JPEG"] = jpeg(1)
    files["train/Zebra/z2.jpg"] = jpeg(2, size=(90, 120))
    files["train/Zebra/z 3 with space.jpg"] = jpeg(3)
    files["train/Zebra/.hidden.jpg"] = jpeg(4)
    files["train/Zebra/notes.txt"] = b"not an image\n"
    files["train/apple/a1.jpg"] = jpeg(5)
    files["train/apple/café_ü.jpg"] = jpeg(6)
    files["train/apple/gray.jpg"] = encode(photo(7).convert("L"), "JPEG", quality=90)
    files["train/apple/cmyk.JPEG"] = encode(photo(8).convert("CMYK"), "JPEG", quality=90)
    files["train/n01/n1.png"] = encode(photo(9), "PNG")
    files["train/n01/png_named.JPEG"] = encode(photo(10), "PNG")
    files["train/n01/truncated.JPEG"] = jpeg(11)[:900]
    files["train/n01/fake.jpg"] = b"this is text, not a JPEG\n" * 4
    files["train/n01/sub/nested.jpg"] = jpeg(12)
    files["train/n01/zz.webp"] = encode(photo(13), "WEBP")
    # val
    for c, cls in enumerate(CLASSES):
        files[f"val/{cls}/v1.jpg"] = jpeg(20 + c)
        files[f"val/{cls}/v2.png" if cls == "n01" else f"val/{cls}/v2.JPEG"] = jpeg(30 + c) if cls != "n01" else encode(
            photo(30 + c), "PNG")
    for rel, data in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
        k += 1
    expected_train = [
        "Zebra/z 3 with space.jpg", "Zebra/z1.JPEG", "Zebra/z2.jpg",
        "apple/a1.jpg", "apple/café_ü.jpg", "apple/cmyk.JPEG", "apple/gray.jpg",
        "n01/fake.jpg", "n01/n1.png", "n01/png_named.JPEG", "n01/truncated.JPEG", "n01/zz.webp", "n01/sub/nested.jpg",
    ]  # fmt: skip
    expected_val = ["Zebra/v1.jpg", "Zebra/v2.JPEG", "apple/v1.jpg", "apple/v2.JPEG", "n01/v1.jpg", "n01/v2.png"]
    return Tree(root, list(CLASSES), expected_train, expected_val,
                unusable={"n01/fake.jpg", "n01/truncated.JPEG"},
                notes={"apple/gray.jpg", "apple/cmyk.JPEG", "n01/png_named.JPEG"})


def write_reference_lmdb(root: Path, out: Path, split: str, label_order: list[str]) -> list[str]:
    """Pack ``root/split`` exactly as the reference tool's LMDB format (docs/data.md).

    Key = datalist line (ASCII); value = msgpack.packb(jpeg bytes + uint16 LE label, use_bin_type=True);
    ``<split>_datalist`` beside ``out/<split>``. Labels follow ``label_order`` (the reference used an
    unsorted directory listing). Images are decoded and re-encoded as JPEG, as the reference did.
    Returns the datalist lines.
    """
    import lmdb

    lines = []
    for cls in sorted((root / split).iterdir()):
        for f in sorted(cls.iterdir()):
            if f.name.startswith(".") or f.suffix.lower() not in (".jpg", ".jpeg", ".png") or not f.name.isascii():
                continue  # the reference encoded keys as ASCII: a non-ASCII name made it crash
            lines.append(f"{cls.name}/{f.name}")
    out.mkdir(parents=True, exist_ok=True)
    env = lmdb.open(str(out / split), map_size=64 << 20)
    kept = []
    with env.begin(write=True) as txn:
        for line in lines:
            try:
                img = Image.open(root / split / line)
                img = img.convert("RGB")
            except Exception:  # noqa: BLE001 - the reference skipped what cv2 could not read
                continue
            label = label_order.index(line.split("/")[0])
            value = msgpack.packb(encode(img, "JPEG", quality=95) + label.to_bytes(2, "little"), use_bin_type=True)
            txn.put(line.encode("ascii"), value)
            kept.append(line)
    env.close()
    (out / f"{split}_datalist").write_text("".join(f"{line}\n" for line in kept), encoding="ascii")
    return kept


@pytest.fixture(scope="session")
def image_tree(tmp_path_factory) -> Tree:
    return make_tree(tmp_path_factory.mktemp("imagenet"))


def wsld(capsys, *argv) -> tuple[int, str, str]:
    """Run the CLI in-process: (exit code, stdout, stderr)."""
    capsys.readouterr()
    rc = main([str(a) for a in argv])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def error_line(err: str) -> str:
    """The one ``wsld: error:`` line of a refused command (and no traceback)."""
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("wsld: error:")]
    assert len(lines) == 1, err
    return lines[0]
