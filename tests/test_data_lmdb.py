"""``wsld data pack`` and LMDB reading: round trip, resume after kill -9, refusal of unfinished packs,
and LMDBs written by the reference tool."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import lmdb
import msgpack
import pytest
from data_fixtures import image_tree, write_reference_lmdb  # noqa: F401  (fixture)

from wsld.cli import main
from wsld.config import DataConfig
from wsld.data.datasets import build_image_datasets
from wsld.data.lmdb_reader import COMPLETE_KEY, decode_record, open_lmdb_index, record_key
from wsld.data.pack import default_output, pack_lmdb
from wsld.errors import DataError

SRC = str(Path(__file__).resolve().parent.parent / "src")


def _records(path: Path) -> list[tuple[str, int, bytes]]:
    env = lmdb.open(str(path), readonly=True, lock=False)
    with env.begin() as txn:
        n = msgpack.unpackb(txn.get(b"__wsld_meta__"))["count"]
        out = [decode_record(txn.get(record_key(i))) for i in range(n)]
    env.close()
    return out


def _quiet(msg):
    pass


def test_pack_round_trip_stores_original_bytes(image_tree, tmp_path):
    out = tmp_path / "lmdb" / "train"
    res = pack_lmdb(image_tree.root, "train", out, workers=2, progress=False, log=_quiet)
    assert res.count == len(image_tree.expected_train) and res.resumed_from == 0
    recs = _records(out)
    assert [r[0] for r in recs] == image_tree.expected_train
    for path, label, data in recs:
        assert data == (image_tree.root / "train" / path).read_bytes()
        assert label == image_tree.classes.index(path.split("/")[0])
    idx = open_lmdb_index(out)
    assert idx.kind == "wsld" and idx.classes == image_tree.classes and idx.complete
    # a second run finds it complete and leaves it alone
    again = pack_lmdb(image_tree.root, "train", out, progress=False, log=_quiet)
    assert again.already_complete


def test_default_output_and_cli(image_tree, tmp_path, capsys):
    root = tmp_path / "ds"
    shutil.copytree(image_tree.root, root)
    assert main(["data", "pack", str(root), "--split", "val", "--workers", "1", "--no-progress"]) == 0
    assert default_output(root, "val") == root / "lmdb" / "val"
    assert "6 images packed" in capsys.readouterr().out
    assert (root / "lmdb" / "val" / "data.mdb").is_file()
    assert main(["data", "pack", str(root), "--split", "nope", "--no-progress"]) == 2


def test_interrupted_pack_resumes_and_matches(image_tree, tmp_path):
    full = tmp_path / "full"
    pack_lmdb(image_tree.root, "train", full, workers=1, progress=False, log=_quiet)
    out = tmp_path / "part"

    def stop(n_done):
        if n_done >= 6:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        pack_lmdb(image_tree.root, "train", out, workers=2, progress=False, log=_quiet, commit_items=3,
                  _on_commit=stop)
    # the unfinished LMDB is refused by training with a one-line hint, and verify flags it
    cfg = DataConfig(format="lmdb", data_path=str(tmp_path), train_split="part", val_split="full", image_size=32)
    with pytest.raises(DataError, match="interrupted pack .*re-run 'wsld data pack'"):
        build_image_datasets(cfg)
    res = pack_lmdb(image_tree.root, "train", out, workers=2, progress=False, log=_quiet, commit_items=3)
    assert res.resumed_from == 6 and res.written == len(image_tree.expected_train) - 6
    assert _records(out) == _records(full)
    build_image_datasets(cfg)  # accepted now


def test_kill_9_mid_pack_then_resume(image_tree, tmp_path):
    out = tmp_path / "killed"
    code = (
        "import os, signal, sys; sys.path.insert(0, %r)\n"
        "from wsld.data.pack import pack_lmdb\n"
        "def hook(n):\n"
        "    if n >= 4: os.kill(os.getpid(), signal.SIGKILL)\n"
        "pack_lmdb(%r, 'train', %r, workers=1, progress=False, commit_items=2, _on_commit=hook)\n"
    ) % (SRC, str(image_tree.root), str(out))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=120)
    assert proc.returncode == -9
    env = lmdb.open(str(out), readonly=True, lock=False)
    with env.begin() as txn:
        assert txn.get(COMPLETE_KEY) is None
        assert int(txn.get(b"__wsld_progress__")) == 4
    env.close()
    res = pack_lmdb(image_tree.root, "train", out, progress=False, log=_quiet)
    assert res.resumed_from == 4
    assert [r[2] for r in _records(out)] == [(image_tree.root / "train" / p).read_bytes()
                                              for p in image_tree.expected_train]


def test_changed_list_restarts_cleanly(image_tree, tmp_path):
    root = tmp_path / "ds"
    shutil.copytree(image_tree.root, root)
    out = tmp_path / "lmdb" / "train"
    with pytest.raises(KeyboardInterrupt):
        pack_lmdb(root, "train", out, progress=False, log=_quiet, commit_items=2,
                  _on_commit=lambda n: (_ for _ in ()).throw(KeyboardInterrupt))
    shutil.copy(root / "train" / "Zebra" / "z1.JPEG", root / "train" / "Zebra" / "z0.jpg")
    logs = []
    res = pack_lmdb(root, "train", out, progress=False, log=logs.append)
    assert res.resumed_from == 0 and res.count == len(image_tree.expected_train) + 1
    assert any("starting over" in m for m in logs)
    assert _records(out)[0][0] == "Zebra/z 3 with space.jpg" and len(_records(out)) == res.count


def test_resize_short(image_tree, tmp_path):
    from PIL import Image
    import io

    out = tmp_path / "small"
    res = pack_lmdb(image_tree.root, "val", out, resize_short=40, progress=False, log=_quiet)
    assert res.reencoded == 6
    for _, _, data in _records(out):
        assert min(Image.open(io.BytesIO(data)).size) == 40


def test_foreign_lmdb_is_not_overwritten(image_tree, tmp_path):
    write_reference_lmdb(image_tree.root, tmp_path, "val", image_tree.classes)
    with pytest.raises(DataError, match="not written by wsld"):
        pack_lmdb(image_tree.root, "val", tmp_path / "val", progress=False, log=_quiet)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "keep.txt").write_text("mine")
    with pytest.raises(DataError, match="holds other files"):
        pack_lmdb(image_tree.root, "val", tmp_path / "other", progress=False, log=_quiet)


def test_lmdb_missing_gives_pack_hint(tmp_path):
    cfg = DataConfig(format="lmdb", data_path=str(tmp_path))
    with pytest.raises(DataError, match="wsld data pack"):
        build_image_datasets(cfg)


def test_reference_lmdb_is_read(image_tree, tmp_path):
    # the reference packer labelled classes in unsorted directory order: here reversed
    order = list(reversed(image_tree.classes))
    lines = write_reference_lmdb(image_tree.root, tmp_path, "train", order)
    write_reference_lmdb(image_tree.root, tmp_path, "val", order)
    assert "n01/truncated.JPEG" not in lines and len(lines) == 8  # it skipped what it could not decode
    cfg = DataConfig(format="lmdb", data_path=str(tmp_path), image_size=32, val_resize=36, on_corrupt="stop")
    train, val = build_image_datasets(cfg)
    assert train.classes == image_tree.classes  # sorted class folders, as torchvision's teachers
    assert len(train) == len(lines)
    assert train.targets == [image_tree.classes.index(line.split("/")[0]) for line in lines]
    img, label = train[(0, 123)]
    assert img.shape == (3, 32, 32) and label == train.targets[0]
    assert "train[" in train.describe(0) and lines[0] in train.describe(0)
    assert all(val[i][0].shape == (3, 32, 32) for i in range(len(val)))

    stored_cfg = DataConfig(format="lmdb", data_path=str(tmp_path), image_size=32, reference_labels="stored")
    train_s, _ = build_image_datasets(stored_cfg)
    assert train_s.targets == [order.index(line.split("/")[0]) for line in lines]
    assert train_s.classes == order
    assert train_s[0][1] == train_s.targets[0]


def test_reference_lmdb_without_datalist_is_refused(image_tree, tmp_path):
    write_reference_lmdb(image_tree.root, tmp_path, "val", image_tree.classes)
    os.remove(tmp_path / "val_datalist")
    with pytest.raises(DataError, match="no wsld metadata and no 'val_datalist'"):
        open_lmdb_index(tmp_path / "val")
