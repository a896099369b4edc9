"""``wsld data verify``: report per image and per class, exit codes, for folders, lists and LMDBs."""

from __future__ import annotations

import re

import lmdb
import msgpack
import pytest
from data_fixtures import image_tree, write_reference_lmdb  # noqa: F401  (fixture)
from PIL import Image

from wsld.cli import main
from wsld.data.images import check_image
from wsld.data.lists import write_lists
from wsld.data.pack import pack_lmdb
from wsld.data.verify import verify_path


def _lines(capsys) -> list[str]:
    return capsys.readouterr().out.splitlines()


def _expect_train_report(lines: list[str], prefix: str) -> None:
    errors = {m.group(1) for m in (re.match(r"ERROR (\S.*?): ", line) for line in lines) if m}
    notes = {m.group(1) for m in (re.match(r"NOTE  (\S.*?): ", line) for line in lines) if m}
    assert errors == {f"{prefix}n01/fake.jpg", f"{prefix}n01/truncated.JPEG"}
    assert {f"{prefix}apple/gray.jpg", f"{prefix}apple/cmyk.JPEG", f"{prefix}n01/png_named.JPEG"} <= notes
    text = "\n".join(lines)
    assert re.search(r"^Zebra\s+3\s+0$", text, re.M)
    assert re.search(r"^apple\s+4\s+0$", text, re.M)
    assert re.search(r"^n01\s+6\s+2$", text, re.M)
    assert "13 images in 3 classes, 11 usable, 2 unusable" in text
    assert "truncated file" in text and "not an image" in text
    assert "CMYK image, converted to RGB" in text and "PNG file named .JPEG" in text


def test_verify_folder_root(image_tree, capsys):
    assert main(["data", "verify", str(image_tree.root), "--workers", "2"]) == 1
    lines = _lines(capsys)
    _expect_train_report(lines, "train/")
    assert any("train/Zebra/notes.txt: not an image file" in line for line in lines)
    assert any(line.startswith("val: 6 images in 3 classes, 6 usable, 0 unusable") for line in lines)


def test_verify_split_folder_and_list(image_tree, tmp_path, capsys):
    assert verify_path(image_tree.root / "val", workers=1, progress=False) == 0
    assert "6 usable, 0 unusable" in capsys.readouterr().out
    write_lists(image_tree.root, tmp_path, log=lambda m: None)
    assert verify_path(tmp_path / "train_list.txt", workers=2, progress=False) == 1
    _expect_train_report(_lines(capsys), "train/")


def test_verify_wsld_lmdb(image_tree, tmp_path, capsys):
    pack_lmdb(image_tree.root, "train", tmp_path / "lmdb" / "train", progress=False, log=lambda m: None)
    assert main(["data", "verify", str(tmp_path / "lmdb" / "train")]) == 1
    _expect_train_report(_lines(capsys), "")


def test_verify_interrupted_lmdb_fails(image_tree, tmp_path, capsys):
    def stop(n):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        pack_lmdb(image_tree.root, "val", tmp_path / "val", progress=False, log=lambda m: None, commit_items=2,
                  _on_commit=stop)
    assert verify_path(tmp_path / "val", progress=False) == 1
    out = capsys.readouterr().out
    assert "interrupted pack: 2 of 6 images written" in out and "FAILED" in out


def test_verify_reference_lmdb_counts_from_stored_labels(image_tree, tmp_path, capsys):
    order = ["n01", "Zebra", "apple"]  # an unsorted listing, as the reference packer may have used
    lines = write_reference_lmdb(image_tree.root, tmp_path, "train", order)
    env = lmdb.open(str(tmp_path / "train"), map_size=64 << 20)
    with env.begin(write=True) as txn:  # damage one value's image bytes, keep its label
        key = lines[1].encode()
        payload = msgpack.unpackb(txn.get(key))
        txn.put(key, msgpack.packb(payload[:200] + payload[-2:], use_bin_type=True))
    env.close()
    assert verify_path(tmp_path / "train", workers=2, progress=False) == 1
    out = capsys.readouterr().out
    assert f"ERROR {lines[1]}: truncated file" in out
    assert re.search(r"^0 n01\s+2\s+0$", out, re.M)  # n01/n1.png + n01/png_named.JPEG (fake/truncated not packed)
    assert re.search(r"^1 Zebra\s+3\s+1$", out, re.M)
    assert re.search(r"^2 apple\s+3\s+0$", out, re.M)
    assert "8 images in 3 classes, 7 usable, 1 unusable" in out
    assert "stored labels follow another class order" in out and "data.reference_labels=stored" in out


def test_verify_bad_input_exits_2(tmp_path, capsys):
    assert main(["data", "verify", str(tmp_path / "missing")]) == 2
    assert "path not found" in capsys.readouterr().err
    (tmp_path / "x.bin").write_bytes(b"\0")
    assert main(["data", "verify", str(tmp_path / "x.bin")]) == 2


def test_decompression_bomb_is_refused(image_tree, monkeypatch):
    data = (image_tree.root / "train" / "Zebra" / "z1.JPEG").read_bytes()
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 120x90 is "too big" now
    res = check_image(data, "z1.JPEG")
    assert res.error and "decompression bomb" in res.error
