"""Hostile data: damaged images, decompression bombs, symlink loops, non-UTF-8 names, list files
that point outside the root or carry wrong labels, and a ``wsld data pack`` killed mid-way.

Each case is either one clear ``wsld: error:`` line (exit 2) or, for a bad image met in training
with ``data.on_corrupt=skip``, a logged skip that names the file; never a traceback, never an
image trained under another image's label.
"""

from __future__ import annotations

import io
import json
import os
import resource
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data_fixtures import error_line, wsld
from reliability_helpers import records, sub_env

CLASSES = ["cat", "dog"]
NON_UTF8 = b"\xff\xfe-latin1-\xe9.jpg"  # not valid UTF-8


def _photo(i: int, size: int = 32) -> Image.Image:
    """A crop of one of scikit-learn's two real sample photos."""
    from sklearn.datasets import load_sample_images

    imgs = load_sample_images().images
    src = imgs[i % 2]
    y, x = (40 + 37 * i) % (src.shape[0] - size), (60 + 53 * i) % (src.shape[1] - size)
    return Image.fromarray(np.ascontiguousarray(src[y : y + size, x : x + size]))


def _jpeg(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def bomb_png(width: int = 100_000, height: int = 100_000) -> bytes:
    """A tiny PNG whose header claims ``width x height`` RGB pixels (30 GB decoded)."""
    data = bytearray(_png(_photo(0, 8)))
    assert data[12:16] == b"IHDR"
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])) & 0xFFFFFFFF)
    return bytes(data)


# file -> why training must skip it (None: usable)
HOSTILE = {
    "train/cat/truncated.jpg": "truncated",
    "train/cat/corrupt.jpg": "corrupt",
    "train/cat/empty.jpg": "empty",
    "train/cat/bomb.png": "decompression bomb",
    "train/cat/one_pixel.png": None,
}


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    """ROOT/{train,val}/{cat,dog}/: real photo crops plus every hostile file above."""
    root = tmp_path_factory.mktemp("hostile") / "ds"
    k = 0
    for split, n in (("train", 6), ("val", 2)):
        for cls in CLASSES:
            (root / split / cls).mkdir(parents=True)
            for j in range(n):
                (root / split / cls / f"{j}.jpg").write_bytes(_jpeg(_photo(k)))
                k += 1
    good = _jpeg(_photo(99))
    cat = root / "train" / "cat"
    (cat / "truncated.jpg").write_bytes(good[: len(good) // 2])
    (cat / "corrupt.jpg").write_bytes(good[:200] + bytes(range(256)) * 4)
    (cat / "empty.jpg").write_bytes(b"")
    (cat / "bomb.png").write_bytes(bomb_png())
    (cat / "one_pixel.png").write_bytes(_png(Image.new("RGB", (1, 1), (200, 30, 30))))
    # a usable photo whose file name is not UTF-8 (bytes path)
    fd = os.open(os.path.join(os.fsencode(root / "train" / "dog"), NON_UTF8), os.O_WRONLY | os.O_CREAT, 0o644)
    os.write(fd, _jpeg(_photo(7)))
    os.close(fd)
    return root


def photo_args(root: Path, fmt: str = "folder") -> list[str]:
    return [
        f"data.format={fmt}", f"data.data_path={root}", "data.dataset=custom", "data.image_size=16",
        "data.val_resize=16", "data.batch_size=6", "data.workers=0", "distill.loss=ce", "train.epochs=1",
        "train.progress=false", "train.log_every=1",
    ]  # fmt: skip




def _bad_files(root: Path) -> set[str]:
    return {str(root / rel) for rel, why in HOSTILE.items() if why}


# --------------------------------------------------------------------------- damaged images


@pytest.mark.parametrize("fmt", ["folder", "list"])
def test_damaged_images_are_skipped_and_logged_never_trained(tmp_path, capsys, tree, teacher_cache, fmt):
    if fmt == "list":
        lists = tmp_path / "lists"
        rc, _, err = wsld(capsys, "data", "list", tree, "--out", lists)
        assert rc == 0, err
        data_path = lists
    else:
        data_path = tree
    run = tmp_path / "run"
    rc, out, err = wsld(capsys, "train", *photo_args(data_path, fmt), teacher_cache, "--out", run)
    assert rc == 0, err
    assert "Traceback" not in err
    bad = _bad_files(tree)
    logged = {r["path"] for r in records(run) if r["kind"] == "corrupt"}
    assert logged == bad, f"skipped {logged}, expected {bad}"
    for path in bad:
        assert f"corrupt image skipped: {path} (" in err
    reasons = {r["path"]: r["error"] for r in records(run) if r["kind"] == "corrupt"}
    for rel, why in HOSTILE.items():
        if why:
            assert why in reasons[str(tree / rel)].lower(), reasons[str(tree / rel)]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["corrupt_images"] == len(bad)
    assert f"{len(bad)} corrupt images were skipped" in out


def test_on_corrupt_stop_names_the_file(tmp_path, capsys, tree, teacher_cache):
    rc, _, err = wsld(capsys, "train", *photo_args(tree), "data.on_corrupt=stop", teacher_cache, "--out", tmp_path / "r")
    assert rc == 2
    line = error_line(err)
    assert "corrupt image" in line and any(p in line for p in _bad_files(tree)), line
    assert "data.on_corrupt=skip" in line


def test_every_sample_keeps_its_own_label_or_is_marked_corrupt(tree):
    """Through the public dataset: a bad image is never replaced by a neighbour (wrong label)."""
    from wsld.config import load_config
    from wsld.data.datasets import CorruptSample, build_image_datasets

    cfg = load_config(None, photo_args(tree))
    train, _ = build_image_datasets(cfg.data)
    bad = _bad_files(tree)
    seen_bad = set()
    for i in range(len(train)):
        item = train[(i, 1234 + i)]
        path = train.describe(i)
        if isinstance(item, CorruptSample):
            assert item.path == path and path in bad
            seen_bad.add(path)
            continue
        image, label = item
        assert path not in bad
        assert train.classes[label] == Path(path).parent.name, f"{path} got label {label}"
        assert image.dtype.is_floating_point is False and image.shape == (3, 16, 16)
    assert seen_bad == bad


def test_decompression_bomb_is_refused_before_allocation(tree):
    """The header claims 10^10 pixels (30 GB): refused from the header, the process never grows."""
    from wsld.data.images import EncodedImage, ImageDecodeError, check_image

    data = (tree / "train/cat/bomb.png").read_bytes()
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(ImageDecodeError, match="decompression bomb"):
        EncodedImage(data).decode()
    assert "decompression bomb" in (check_image(data, "bomb.png").error or "")
    grew_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak_before) / 1024
    assert grew_mib < 200, f"peak memory grew by {grew_mib:.0f} MiB reading a bomb header"


def test_verify_reports_each_damaged_file_and_exits_1(capsys, tree):
    rc, out, err = wsld(capsys, "data", "verify", tree / "train", "--workers", "1", "--no-progress")
    assert rc == 1
    assert "Traceback" not in out + err
    text = out + err
    for path in _bad_files(tree):
        assert Path(path).name in text
    assert "one_pixel.png" not in "".join(line for line in text.splitlines() if "ERROR" in line)


def test_non_utf8_file_name_is_listed_and_trained(tmp_path, capsys, tree):
    lists = tmp_path / "lists"
    rc, _, err = wsld(capsys, "data", "list", tree, "--out", lists)
    assert rc == 0, err
    raw = (lists / "train_list.txt").read_bytes()
    assert b"dog/" + NON_UTF8 + b"\t1\n" in raw, "the file name must round-trip byte for byte with its label"
    from wsld.config import load_config
    from wsld.data.datasets import build_image_datasets

    train, _ = build_image_datasets(load_config(None, photo_args(lists, "list")).data)
    idx = next(i for i in range(len(train)) if os.fsencode(train.describe(i)).endswith(NON_UTF8))
    image, label = train[(idx, 0)]
    assert train.classes[label] == "dog"


# --------------------------------------------------------------------------- hostile trees and lists


def test_symlink_loop_in_the_tree_is_a_clear_error(tmp_path, capsys, tree):
    root = tmp_path / "ds"
    for split in ("train", "val"):
        for cls in CLASSES:
            (root / split / cls).mkdir(parents=True)
            (root / split / cls / "0.jpg").write_bytes((tree / split / cls / "0.jpg").read_bytes())
    (root / "train" / "cat" / "loop").symlink_to("..")  # train/cat/loop -> train: dog's images under cat
    for argv in (["data", "list", root], ["train", *photo_args(root), f"model.teacher_cache={tmp_path}/c", "--out", tmp_path / "r"]):
        rc, _, err = wsld(capsys, *argv)
        assert rc == 2
        line = error_line(err)
        assert "symlink loop" in line and "train/cat/loop" in line
    assert not (root / "train_list.txt").exists()


def _list_root(tmp_path: Path, tree: Path, train_lines: list[str]) -> Path:
    """A list-format root: classes.txt, a good val list, and the given train lines."""
    root = tmp_path / "lists"
    root.mkdir()
    (root / "classes.txt").write_text("cat\ndog\n")
    (root / "train_list.txt").write_text(f"# root: {tree}\n" + "".join(f"{line}\n" for line in train_lines))
    (root / "val_list.txt").write_text(f"# root: {tree}\ncat/0.jpg\t0\ndog/0.jpg\t1\n")
    return root


GOOD_LINES = [f"{c}/{j}.jpg\t{y}" for y, c in enumerate(CLASSES) for j in range(6)]


@pytest.mark.parametrize(
    "line, expect",
    [
        ("../../../../etc/passwd\t0", "points outside the dataset root"),
        ("../val/cat/0.jpg/../../../..\t0", "points outside the dataset root"),
        ("/etc/passwd\t0", "points outside the dataset root"),
        ("cat/0.jpg\t2", "label 2 is outside 0..1"),
        ("cat/0.jpg\t-1", "label -1 is outside 0..1"),
        ("cat/0.jpg\tdog", "is not an integer"),
        ("cat/0.jpg", "expected 'path<TAB>label'"),
    ],
)
def test_a_bad_list_line_is_one_error_naming_file_and_line(tmp_path, capsys, tree, line, expect):
    root = _list_root(tmp_path, tree, GOOD_LINES[:3] + [line] + GOOD_LINES[3:])
    rc, _, err = wsld(capsys, "train", *photo_args(root, "list"), f"model.teacher_cache={tmp_path}/c", "--out", tmp_path / "r")
    assert rc == 2
    msg = error_line(err)
    assert expect in msg and f"{root / 'train_list.txt'}:5" in msg, msg
    assert not (tmp_path / "r").exists()
    rc, out, err = wsld(capsys, "data", "verify", root / "train_list.txt", "--workers", "1", "--no-progress")
    assert rc == 2
    assert expect in error_line(err)


# --------------------------------------------------------------------------- pack killed mid-way

_PACK_AND_DIE = """
import os, signal, sys
from wsld.data.pack import pack_lmdb
def die(n):
    if n >= int(sys.argv[3]):
        os.kill(os.getpid(), signal.SIGKILL)  # kill -9 right after a committed transaction
pack_lmdb(sys.argv[1], "train", sys.argv[2], workers=1, progress=False, commit_items=2, _on_commit=die)
"""


def _lmdb_items(path: Path) -> dict[bytes, bytes]:
    import lmdb

    env = lmdb.open(str(path), readonly=True, lock=False, subdir=True)
    try:
        with env.begin() as txn:
            return dict(txn.cursor())
    finally:
        env.close()


def test_pack_killed_midway_is_refused_by_training_then_resumes_to_an_identical_lmdb(tmp_path, capsys, tree):
    pytest.importorskip("wsld.data.pack")
    out = tmp_path / "lmdb"
    rc, _, err = wsld(capsys, "data", "pack", tree, "--split", "val", "--out", out / "val", "--no-progress")
    assert rc == 0, err
    p = subprocess.run([sys.executable, "-c", _PACK_AND_DIE, str(tree), str(out / "train"), "6"], env=sub_env(),
                       capture_output=True, text=True, timeout=120)  # fmt: skip
    assert p.returncode == -9, p.stderr

    # training refuses the unfinished LMDB with one line that says how to finish it
    rc, _, err = wsld(capsys, "train", *photo_args(out, "lmdb"), f"model.teacher_cache={tmp_path}/c", "--out", tmp_path / "r")
    assert rc == 2
    line = error_line(err)
    assert str(out / "train") in line and "wsld data pack" in line, line
    assert not (tmp_path / "r").exists()

    # the same pack command resumes after the last commit and finishes
    rc, stdout, err = wsld(capsys, "data", "pack", tree, "--split", "train", "--out", out / "train", "--no-progress")
    assert rc == 0, err
    assert "resuming an interrupted pack at image 6 of" in err
    assert "resumed at 6" in stdout

    # the result equals an uninterrupted pack, record for record (timestamps aside)
    rc, _, err = wsld(capsys, "data", "pack", tree, "--split", "train", "--out", tmp_path / "fresh", "--no-progress")
    assert rc == 0, err
    got, want = _lmdb_items(out / "train"), _lmdb_items(tmp_path / "fresh")
    assert got.keys() == want.keys()
    import msgpack

    for k in got:
        if k in (b"__wsld_meta__", b"__wsld_complete__"):  # msgpack dicts with a timestamp
            a, b = (msgpack.unpackb(v, raw=False, unicode_errors="surrogateescape") for v in (got[k], want[k]))
            a = {x: y for x, y in a.items() if x not in ("created", "finished")}
            b = {x: y for x, y in b.items() if x not in ("created", "finished")}
            assert a == b, k
        else:
            assert got[k] == want[k], k

    # the non-UTF-8 file name came through the LMDB byte for byte, with its label
    from wsld.config import load_config
    from wsld.data.datasets import build_image_datasets

    train, _ = build_image_datasets(load_config(None, photo_args(out, "lmdb")).data)
    idx = next(i for i in range(len(train)) if os.fsencode(train.describe(i)).endswith(NON_UTF8))
    assert train.classes[train[(idx, 0)][1]] == "dog"

    # and it trains, skipping the same damaged images as the folder does
    run = tmp_path / "run"
    rc, _, err = wsld(capsys, "train", *photo_args(out, "lmdb"), f"model.teacher_cache={tmp_path}/c", "--out", run)
    assert rc == 0, err
    assert json.loads((run / "summary.json").read_text())["corrupt_images"] == len(_bad_files(tree))
