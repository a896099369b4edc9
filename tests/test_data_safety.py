"""Nothing lost, nothing silently wrong (issue 13, data side): a finished LMDB is never replaced
without --overwrite, file names that would corrupt a list are refused, nothing outside the dataset
root or other than a regular file is ever read, and the reference tool's traps (a doubled
datalist, labels in another class order, splits listed differently) are handled out loud."""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path

import lmdb
import pytest
from data_fixtures import encode, error_line, image_tree, photo, write_reference_lmdb, wsld  # noqa: F401  (fixture)

from wsld.config import DataConfig
from wsld.data.datasets import CorruptSample, build_image_datasets
from wsld.data.lmdb_reader import open_lmdb_index, release_env
from wsld.data.pack import pack_lmdb
from wsld.errors import DataError

pytestmark = pytest.mark.timeout(60)  # a FIFO that is opened blocks for ever: fail instead of hanging




def small_tree(root: Path) -> Path:
    """ROOT/{train,val}/{cat,dog}/{0,1}.jpg: crops of real photos."""
    for s, split in enumerate(("train", "val")):
        for c, cls in enumerate(("cat", "dog")):
            (root / split / cls).mkdir(parents=True)
            for j in range(2):
                (root / split / cls / f"{j}.jpg").write_bytes(encode(photo(10 * s + 2 * c + j, 40, 30)))
    return root


def lmdb_state(path: Path) -> tuple[int, bool, bytes | None]:
    """(entries, complete, progress) of an LMDB, read without wsld."""
    release_env(path)
    env = lmdb.open(str(path), readonly=True, lock=False)
    try:
        with env.begin() as txn:
            return txn.stat()["entries"], txn.get(b"__wsld_complete__") is not None, txn.get(b"__wsld_progress__")
    finally:
        env.close()


def _quiet(msg: str) -> None:
    pass


# --------------------------------------------------------------------------- 1. pack never replaces a finished LMDB


def test_a_subset_list_packed_without_out_never_replaces_the_full_pack(tmp_path, capsys):
    root = small_tree(tmp_path / "ds")
    assert wsld(capsys, "data", "list", root)[0] == 0
    rc, _, err = wsld(capsys, "data", "pack", root, "--split", "train", "--no-progress")
    assert rc == 0, err
    full = root / "lmdb" / "train"
    before = lmdb_state(full)
    subset = root / "my_subset.txt"  # an edited copy of train_list.txt, not named <split>_list.txt
    lines = (root / "train_list.txt").read_text().splitlines()
    subset.write_text("\n".join(line for line in lines if "/0.jpg" in line or line.startswith("#")) + "\n")

    rc, _, err = wsld(capsys, "data", "pack", root, "--split", "train", "--list", subset, "--no-progress")
    assert rc == 2
    line = error_line(err)
    assert str(full) in line and "complete pack" in line and "--overwrite" in line and "--out" in line, line
    assert lmdb_state(full) == before and len(open_lmdb_index(full)) == 4

    # packing another split into it is refused the same way
    rc, _, err = wsld(capsys, "data", "pack", root, "--split", "val", "--out", full, "--no-progress")
    assert rc == 2 and "complete pack" in error_line(err)
    assert lmdb_state(full) == before

    # the subset packs from its images in ROOT/train with --out, and replaces the full pack with --overwrite
    rc, out, err = wsld(capsys, "data", "pack", root, "--split", "train", "--list", subset, "--out", tmp_path / "sub",
                        "--no-progress")
    assert rc == 0, err
    assert len(open_lmdb_index(tmp_path / "sub")) == 2
    rc, _, err = wsld(capsys, "data", "pack", root, "--split", "train", "--list", subset, "--overwrite",
                      "--no-progress")
    assert rc == 0, err
    assert len(open_lmdb_index(full)) == 2


def test_a_pack_that_cannot_start_leaves_an_unfinished_pack_resumable(tmp_path, capsys):
    root = small_tree(tmp_path / "ds")
    assert wsld(capsys, "data", "list", root)[0] == 0
    out = tmp_path / "train.lmdb"

    def stop(n_done: int) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        pack_lmdb(root, "train", out, workers=1, progress=False, log=_quiet, commit_items=2, _on_commit=stop)
    before = lmdb_state(out)
    assert before[2] == b"2" and not before[1]
    # a list for another split, a list whose split folder does not exist, a bad list line: refused first
    (root / "extra").mkdir()
    shutil.copy(root / "train_list.txt", root / "extra" / "train_list.txt")
    shutil.copy(root / "classes.txt", root / "extra" / "classes.txt")
    (root / "bad.txt").write_text("cat/0.jpg\t7\n")
    for list_file, expect in ((root / "val_list.txt", "lists split 'val' but --split is 'train'"),
                              (root / "extra" / "train_list.txt", "which is not a folder"),
                              (root / "bad.txt", "bad.txt:1: label 7 is outside")):
        rc, _, err = wsld(capsys, "data", "pack", root, "--split", "train", "--list", list_file, "--out", out,
                          "--no-progress")
        assert rc == 2
        assert expect in error_line(err), err
        assert lmdb_state(out) == before, list_file
    rc, out_text, err = wsld(capsys, "data", "pack", root, "--split", "train", "--out", out, "--no-progress")
    assert rc == 0, err
    assert "resumed at 2" in out_text


# --------------------------------------------------------------------------- 2. control characters in names


@pytest.mark.parametrize("name, char", [("0.jpg\t0\nx.jpg", "U+0009"), ("a\rb.jpg", "U+000D"),
                                        ("c\x1bd.jpg", "U+001B")])
def test_list_refuses_a_file_name_with_a_control_character(tmp_path, capsys, name, char):
    """``0.jpg<TAB>0<LF>x.jpg`` written as is would add a line training ``x.jpg`` under label 0."""
    root = small_tree(tmp_path / "ds")
    (root / "train" / "dog" / name).write_bytes((root / "train" / "dog" / "0.jpg").read_bytes())
    rc, _, err = wsld(capsys, "data", "list", root)
    assert rc == 2
    line = error_line(err)
    assert repr(f"train/dog/{name}") in line and f"control character ({char})" in line, line
    assert not (root / "train_list.txt").exists()


@pytest.mark.parametrize("body", ["cat/0.jpg\t0\ncat/1\r.jpg\t0\n", "cat/0.jpg\t0\ncat/0.jpg\t0\tdog/1.jpg\t1\n",
                                  "cat/0.jpg\t0\ndog/\x0b1.jpg 1\n"])
def test_list_reader_refuses_control_characters_naming_file_and_line(tmp_path, capsys, body):
    root = small_tree(tmp_path / "ds")
    (root / "classes.txt").write_text("cat\ndog\n")
    (root / "train_list.txt").write_bytes(body.encode())
    rc, _, err = wsld(capsys, "data", "verify", root / "train_list.txt", "--workers", "1", "--no-progress")
    assert rc == 2
    line = error_line(err)
    assert f"{root / 'train_list.txt'}:2: control character" in line, line
    # Windows line endings are not control characters in a line
    (root / "train_list.txt").write_bytes(b"cat/0.jpg\t0\r\ndog/1.jpg\t1\r\n")
    rc, out, err = wsld(capsys, "data", "verify", root / "train_list.txt", "--workers", "1", "--no-progress")
    assert rc == 0, err
    assert "2 images in 2 classes" in out


# --------------------------------------------------------------------------- 3. symlinks out, FIFOs, devices


def _hostile(root: Path, kind: str) -> str:
    target = root / "train" / "cat" / "evil.jpg"
    if kind == "fifo":
        os.mkfifo(target)
    elif kind == "passwd":
        target.symlink_to("/etc/passwd")
    elif kind == "zero":
        target.symlink_to("/dev/zero")
    elif kind == "folder":  # a linked folder that leaves the root
        (root.parent / "outside").mkdir(exist_ok=True)
        (root.parent / "outside" / "x.jpg").write_bytes((root / "train" / "cat" / "0.jpg").read_bytes())
        target = root / "train" / "cat" / "linked"
        target.symlink_to(root.parent / "outside")
    else:  # the split folder itself lives on another disk
        shutil.move(root / "train", root.parent / "train_elsewhere")
        (root / "train").symlink_to(root.parent / "train_elsewhere")
        return "train"
    return f"train/cat/{target.name}"


@pytest.mark.parametrize("kind, expect", [("fifo", "is a FIFO, not an image file"),
                                          ("passwd", "leads outside the dataset root"),
                                          ("zero", "leads outside the dataset root"),
                                          ("folder", "leads outside the dataset root"),
                                          ("split", "symlink train leads outside the dataset root")])
def test_list_pack_verify_and_train_refuse_links_out_of_the_root_and_fifos(tmp_path, capsys, kind, expect):
    root = small_tree(tmp_path / "ds")
    rel = _hostile(root, kind)
    commands = [["data", "list", root], ["data", "pack", root, "--split", "train", "--no-progress"],
                ["data", "verify", root, "--workers", "1", "--no-progress"]]
    for argv in commands:
        rc, _, err = wsld(capsys, *argv)
        assert rc == 2, argv
        line = error_line(err)
        assert rel in line and expect in line, line
    with pytest.raises(DataError, match=expect):
        build_image_datasets(DataConfig(format="folder", data_path=str(root), image_size=16, val_resize=16))
    assert not (root / "lmdb").exists()


def test_symlinks_inside_the_root_are_followed(tmp_path, capsys):
    root = small_tree(tmp_path / "ds")
    (root / "train" / "bird").symlink_to(root / "val" / "cat")  # a linked class folder
    (root / "val" / "bird").mkdir()
    (root / "val" / "bird" / "0.jpg").symlink_to("../dog/0.jpg")  # a linked file
    rc, out, err = wsld(capsys, "data", "list", root)
    assert rc == 0, err
    assert "bird/0.jpg\t0" in (root / "train_list.txt").read_text()
    train, val = build_image_datasets(DataConfig(format="list", data_path=str(root), image_size=16, val_resize=16))
    assert all(not isinstance(train[i], CorruptSample) for i in range(len(train)))
    assert all(not isinstance(val[i], CorruptSample) for i in range(len(val)))


def test_a_file_swapped_after_listing_is_never_read(tmp_path, capsys):
    """Between listing and reading, images become a FIFO, a link to /etc/passwd and one to /dev/zero:
    training skips each as corrupt, verify reports each, pack stops naming the file; nothing blocks."""
    root = small_tree(tmp_path / "ds")
    assert wsld(capsys, "data", "list", root)[0] == 0
    swapped = {"train/cat/0.jpg": "a FIFO, not a regular file", "train/cat/1.jpg": "outside the dataset root",
               "train/dog/0.jpg": "outside the dataset root"}
    for rel in swapped:
        (root / rel).unlink()
    os.mkfifo(root / "train/cat/0.jpg")
    (root / "train/cat/1.jpg").symlink_to("/etc/passwd")
    (root / "train/dog/0.jpg").symlink_to("/dev/zero")

    train, _ = build_image_datasets(DataConfig(format="list", data_path=str(root), image_size=16, val_resize=16))
    for i in range(len(train)):
        item, path = train[(i, 0)], train.describe(i)
        rel = os.path.relpath(path, root)
        if rel in swapped:
            assert isinstance(item, CorruptSample) and swapped[rel] in item.error, (rel, item)
        else:
            assert not isinstance(item, CorruptSample)

    rc, out, err = wsld(capsys, "data", "verify", root / "train_list.txt", "--workers", "1", "--no-progress")
    assert rc == 1
    for rel, why in swapped.items():
        assert any(line.startswith(f"ERROR {rel}:") and why in line for line in out.splitlines()), out
    rc, _, err = wsld(capsys, "data", "pack", root, "--split", "train", "--list", root / "train_list.txt",
                      "--no-progress")
    assert rc == 2
    line = error_line(err)
    assert "train/cat/0.jpg" in line and "a FIFO" in line, line
    assert not (root / "lmdb" / "train" / "data.mdb").exists()


# --------------------------------------------------------------------------- 4. the reference tool's traps


def test_a_doubled_reference_datalist_is_read_once_and_reported(image_tree, tmp_path, capsys):
    """The reference list maker appends: a re-run lists every image twice."""
    lines = write_reference_lmdb(image_tree.root, tmp_path, "train", image_tree.classes)
    write_reference_lmdb(image_tree.root, tmp_path, "val", image_tree.classes)
    datalist = tmp_path / "train_datalist"
    datalist.write_text(datalist.read_text() * 2)
    capsys.readouterr()
    train, _ = build_image_datasets(DataConfig(format="lmdb", data_path=str(tmp_path), image_size=16, val_resize=16))
    assert len(train) == len(lines)
    err = capsys.readouterr().err
    assert f"[wsld] warning: {datalist} lists {len(lines)} image(s) more than once" in err, err
    rc, out, err = wsld(capsys, "data", "verify", tmp_path / "train", "--workers", "1", "--no-progress")
    assert rc == 0, err
    n = len(lines)
    assert f"train_datalist has {2 * n} lines for {n} LMDB entries: {n} line(s) repeat an earlier one" in out
    assert f"{len(lines)} images in" in out


def test_reference_labels_in_another_class_order_are_relabelled_out_loud(image_tree, tmp_path, capsys):
    lines = write_reference_lmdb(image_tree.root, tmp_path / "sorted", "train", image_tree.classes)
    write_reference_lmdb(image_tree.root, tmp_path / "sorted", "val", image_tree.classes)
    capsys.readouterr()
    build_image_datasets(DataConfig(format="lmdb", data_path=str(tmp_path / "sorted"), image_size=16, val_resize=16))
    assert "[wsld] warning" not in capsys.readouterr().err

    order = ["n01", "Zebra", "apple"]  # the reference packer's unsorted directory listing
    write_reference_lmdb(image_tree.root, tmp_path / "unsorted", "train", order)
    write_reference_lmdb(image_tree.root, tmp_path / "unsorted", "val", order)
    train, _ = build_image_datasets(DataConfig(format="lmdb", data_path=str(tmp_path / "unsorted"), image_size=16,
                                               val_resize=16))
    assert train.classes == image_tree.classes
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("[wsld] warning:")]
    folders = [line.split("/")[0] for line in lines]
    n_differ = sum(1 for f in folders if order.index(f) != image_tree.classes.index(f))
    assert len(warnings) == 2, warnings  # one per split
    assert f"{n_differ} of {len(lines)} samples (3 of 3 class folders" in warnings[0], warnings[0]
    assert "data.reference_labels=stored" in warnings[0]


def test_stored_labels_accept_splits_listed_differently_and_name_a_conflicting_folder(image_tree, tmp_path):
    order = ["n01", "apple", "Zebra"]
    write_reference_lmdb(image_tree.root, tmp_path, "train", order)
    write_reference_lmdb(image_tree.root, tmp_path, "val", order)
    # val lists its images in another order and lacks the class stored as the highest label
    datalist = tmp_path / "val_datalist"
    val_lines = [line for line in datalist.read_text().splitlines() if not line.startswith("Zebra/")]
    random.Random(0).shuffle(val_lines)
    datalist.write_text("".join(f"{line}\n" for line in val_lines))
    cfg = DataConfig(format="lmdb", data_path=str(tmp_path), image_size=16, val_resize=16, reference_labels="stored")
    train, val = build_image_datasets(cfg)
    assert train.classes == val.classes == order
    assert val.targets == [order.index(line.split("/")[0]) for line in val_lines]

    # packed in another label order, the val split would pair 'apple' images with train's 'n01' label
    write_reference_lmdb(image_tree.root, tmp_path / "b", "train", order)
    write_reference_lmdb(image_tree.root, tmp_path / "b", "val", ["apple", "n01", "Zebra"])
    cfg.data_path = str(tmp_path / "b")
    with pytest.raises(DataError, match="class folder 'apple' is stored as label 1 in .*train but 0 in .*val"):
        build_image_datasets(cfg)
