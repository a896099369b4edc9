"""``wsld data list | pack | verify`` run from the command line in a fresh process without importing
torch or torchvision (issue: a 6 s start and ~900 MiB resident for a packer that needs neither),
and still do their job on a small tree of real JPEGs. Building the whole CLI parser (``wsld --help``)
imports no torch either: every parser module keeps heavy imports inside its command."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from data_fixtures import encode, photo

HEAVY = ("torch", "torchvision", "cv2")
# runs each `wsld ...` command line given as a JSON list in one fresh interpreter, then reports the
# exit codes and which heavy packages ended up imported
RUNNER = r"""
import contextlib, io, json, sys
from wsld.cli import main
report = {"rc": [], "out": []}
for argv in json.loads(sys.argv[1]):
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        try:
            rc = main(argv)
        except SystemExit as e:  # --help
            rc = e.code
    report["rc"].append(rc)
    report["out"].append(buf.getvalue())
report["heavy"] = sorted({m.split(".")[0] for m in sys.modules} & set(%r))
print("REPORT " + json.dumps(report), file=sys.stderr)
""" % (HEAVY,)


def run_wsld(*commands: list[str]) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", RUNNER, json.dumps([[str(a) for a in c] for c in commands])],
                          capture_output=True, text=True, env=env, timeout=120)  # fmt: skip
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("REPORT ")]
    assert proc.returncode == 0 and lines, proc.stderr
    return json.loads(lines[-1][len("REPORT "):])


@pytest.fixture(scope="module")
def photo_tree(tmp_path_factory) -> Path:
    """ROOT/{train,val}/<class>/*.JPEG: 2 classes of real photo crops, 3 train and 1 val image each."""
    root = tmp_path_factory.mktemp("photos")
    for c, cls in enumerate(["cat", "dog"]):
        for split, n in (("train", 3), ("val", 1)):
            d = root / split / cls
            d.mkdir(parents=True)
            for i in range(n):
                (d / f"{cls}_{i}.JPEG").write_bytes(encode(photo(10 * c + i + (5 if split == "val" else 0)), quality=90))
    return root


def test_data_commands_work_from_the_cli_without_importing_torch(photo_tree, tmp_path):
    lists, lmdb_out = tmp_path / "lists", tmp_path / "lmdb" / "train"
    report = run_wsld(
        ["data", "list", photo_tree, "--out", lists],
        ["data", "pack", photo_tree, "--split", "train", "--out", lmdb_out, "--workers", "2", "--no-progress"],
        ["data", "verify", photo_tree, "--no-progress", "--workers", "2"],
        ["data", "verify", lmdb_out, "--no-progress"],
        ["data", "verify", lists / "val_list.txt", "--no-progress"],
    )
    assert report["heavy"] == [], f"wsld data imported {report['heavy']}"
    assert report["rc"] == [0, 0, 0, 0, 0], report
    list_out, pack_out, verify_root, verify_lmdb, verify_list = report["out"]
    assert "train_list.txt: 6 images in 2 classes" in list_out and "val_list.txt: 2 images in 2 classes" in list_out
    train_lines = [ln for ln in (lists / "train_list.txt").read_text().splitlines() if not ln.startswith("#")]
    assert train_lines[0] == "cat/cat_0.JPEG\t0" and train_lines[-1] == "dog/dog_2.JPEG\t1"
    assert (lists / "classes.txt").read_text().split() == ["cat", "dog"]
    assert "6 images packed" in pack_out and (lmdb_out / "data.mdb").is_file()
    assert "8 images, 0 unusable" in verify_root
    assert "6 images in 2 classes, 6 usable, 0 unusable" in verify_lmdb  # every packed image decodes
    assert "2 images in 2 classes, 2 usable" in verify_list


def test_a_corrupt_photo_is_found_by_verify_without_torch(photo_tree, tmp_path):
    bad = tmp_path / "root"
    for split in ("train", "val"):
        for cls in ("cat", "dog"):
            (bad / split / cls).mkdir(parents=True)
            src = sorted((photo_tree / split / cls).iterdir())[0]
            (bad / split / cls / src.name).write_bytes(src.read_bytes())
    (bad / "train" / "dog" / "cut.JPEG").write_bytes(encode(photo(3), quality=90)[:700])  # truncated JPEG
    report = run_wsld(["data", "verify", bad / "train", "--no-progress"])
    assert report["heavy"] == [] and report["rc"] == [1]
    assert "1 unusable" in report["out"][0]


def test_building_the_cli_parser_imports_no_torch():
    report = run_wsld(["--help"], ["data", "--help"], ["data", "pack", "--help"], ["export", "--help"],
                      ["soft-labels", "--help"], ["train", "--help"])
    assert report["heavy"] == [], f"the parser imported {report['heavy']}"
    assert report["rc"] == [0] * 6
    assert "data" in report["out"][0] and "--resize-short" in report["out"][2]
    assert "--format FORMAT" in report["out"][3] and "float16 | float32" in report["out"][4]


def test_choices_read_on_use_still_refuse_a_bad_value_with_the_choices(capsys):
    from wsld.cli import main

    with pytest.raises(SystemExit) as e:
        main(["export", "ckpt.pt", "--format", "pickle"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "invalid choice: 'pickle'" in err and "'onnx', 'torchscript', 'safetensors'" in err
    with pytest.raises(SystemExit) as e:
        main(["soft-labels", "--crops", "2", "--precision", "int8"])
    assert e.value.code == 2 and "'float16', 'float32'" in capsys.readouterr().err
