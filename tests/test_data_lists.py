"""``wsld data list`` and list files: content, ImageFolder label order, overwrite, errors."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from data_fixtures import image_tree  # noqa: F401  (fixture)

from wsld.cli import main
from wsld.data.lists import read_list, scan_dataset, write_lists
from wsld.errors import DataError


def _entries(path):
    lines = path.read_text(encoding="utf-8").splitlines()
    return [line for line in lines if not line.startswith("# ")]


def test_list_matches_imagefolder(image_tree, tmp_path, capsys):
    from torchvision.datasets import ImageFolder

    assert main(["data", "list", str(image_tree.root), "--out", str(tmp_path)]) == 0
    assert "skipped 1 non-image file" in capsys.readouterr().err  # notes.txt
    classes = (tmp_path / "classes.txt").read_text(encoding="utf-8").splitlines()
    ref = ImageFolder(str(image_tree.root / "train"))
    assert {c: i for i, c in enumerate(classes)} == ref.class_to_idx
    train = _entries(tmp_path / "train_list.txt")
    assert [line.split("\t")[0] for line in train] == image_tree.expected_train
    # same order and labels as ImageFolder's samples, less the hidden file ImageFolder would include
    split_dir = image_tree.root / "train"
    ref_samples = [(Path(p).relative_to(split_dir).as_posix(), y) for p, y in ref.samples]
    ref_samples = [(p, y) for p, y in ref_samples if not Path(p).name.startswith(".")]
    assert [(line.split("\t")[0], int(line.split("\t")[1])) for line in train] == ref_samples
    assert len(_entries(tmp_path / "val_list.txt")) == len(image_tree.expected_val)
    # the list reads back, relative to the dataset root recorded in its header
    lst = read_list(tmp_path / "train_list.txt")
    assert lst.split_dir == image_tree.root / "train"
    assert all((lst.split_dir / p).is_file() for p in lst.paths)


def test_rerun_overwrites(image_tree, tmp_path):
    write_lists(image_tree.root, tmp_path, log=lambda m: None)
    first = (tmp_path / "train_list.txt").read_bytes()
    write_lists(image_tree.root, tmp_path, log=lambda m: None)
    assert (tmp_path / "train_list.txt").read_bytes() == first
    assert len(_entries(tmp_path / "train_list.txt")) == len(image_tree.expected_train)


def test_empty_class_folder_is_named(image_tree, tmp_path):
    root = tmp_path / "ds"
    shutil.copytree(image_tree.root, root)
    for f in (root / "val" / "apple").iterdir():
        f.unlink()
    with pytest.raises(DataError, match="val/apple"):
        write_lists(root)
    shutil.rmtree(root / "val" / "apple")
    with pytest.raises(DataError, match="val/apple' is missing"):
        write_lists(root)
    assert main(["data", "list", str(root)]) == 2


def test_flat_val_and_missing_root(tmp_path):
    (tmp_path / "val").mkdir()
    (tmp_path / "val" / "a.JPEG").write_bytes(b"x")
    with pytest.raises(DataError, match="no class folders"):
        scan_dataset(tmp_path, ["val"])
    with pytest.raises(DataError, match="not found"):
        scan_dataset(tmp_path / "nope")
    with pytest.raises(DataError, match="--splits"):
        scan_dataset(tmp_path / "val")


@pytest.mark.parametrize(
    "line, match",
    [
        ("Zebra/z1.JPEG\t7", "label 7 is outside"),
        ("Zebra/z1.JPEG\tx", "not an integer"),
        ("../../etc/passwd\t0", "outside the dataset root"),
        ("/etc/passwd\t0", "outside the dataset root"),
        ("no_label_here", "expected 'path<TAB>label'"),
    ],
)
def test_bad_list_lines_name_the_line(tmp_path, line, match):
    (tmp_path / "classes.txt").write_text("Zebra\napple\nn01\n")
    (tmp_path / "train").mkdir()
    (tmp_path / "train_list.txt").write_text(f"Zebra/z2.jpg\t0\n{line}\n")
    with pytest.raises(DataError, match=match) as e:
        read_list(tmp_path / "train_list.txt")
    assert "train_list.txt:2" in str(e.value)


def test_list_accepts_spaces_and_space_separator(tmp_path):
    (tmp_path / "classes.txt").write_text("a\nb\n")
    (tmp_path / "train").mkdir()
    (tmp_path / "train_list.txt").write_text("a/x y.jpg 1\nb/../b/z.jpg\t0\n")
    lst = read_list(tmp_path / "train_list.txt")
    assert lst.paths == ["a/x y.jpg", "b/../b/z.jpg"] and lst.labels == [1, 0]
