"""Damaged files are one line (issue 21): a truncated or corrupted LMDB or soft-label store, flipped
bytes in packed records, stores and PNGs, records moved between classes, list names that look like
comments, two packs into one folder, a full disk, a checkpoint naming code to import, and the
store's default place. Anything that could die of a signal runs in a subprocess."""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import threading
import time
from pathlib import Path

import lmdb
import pytest
from data_fixtures import encode, error_line, photo, wsld
from PIL import Image
from reliability_helpers import WSLD, sub_env

from wsld.checkpoint import load_checkpoint, save_checkpoint
from wsld.data.lmdb_reader import record_key, release_env
from wsld.data.pack import pack_lmdb
from wsld.locks import LOCK_NAME
from wsld.soft_labels.store import image_key

pytestmark = pytest.mark.timeout(180)

DIGITS = ["data.dataset=digits", "data.batch_size=64", "data.workers=0", "train.progress=false", "teacher_train.epochs=1",
          "train.epochs=1", "model.teacher=cnn_teacher", "model.student=cnn_student"]  # fmt: skip


def photo_tree(root: Path, classes=("cat", "dog"), per_class: int = 3) -> Path:
    """ROOT/{train,val}/<class>/<j>.jpg: small crops of real photos."""
    for s, split in enumerate(("train", "val")):
        for c, cls in enumerate(classes):
            (root / split / cls).mkdir(parents=True)
            for j in range(per_class):
                (root / split / cls / f"{j}.jpg").write_bytes(encode(photo(100 * s + 10 * c + j, 40, 30)))
    return root


def photo_args(data_path: Path, cache: Path, fmt: str = "lmdb") -> list[str]:
    return [f"data.format={fmt}", f"data.data_path={data_path}", "data.image_size=16", "data.val_resize=16",
            "data.batch_size=4", "data.workers=0", "train.progress=false", "teacher_train.epochs=1", "train.epochs=1",
            f"model.teacher_cache={cache}", "distill.allow_weak_teacher=true"]  # fmt: skip


def run(*argv, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([*WSLD, *map(str, argv)], capture_output=True, text=True, env=sub_env(), timeout=timeout)


def rewrite(path: Path, edit) -> None:
    """Change an LMDB's records in place (``edit(txn)``), as a damaged disk would."""
    release_env(path)
    env = lmdb.open(str(path), subdir=True)
    try:
        with env.begin(write=True) as txn:
            edit(txn)
    finally:
        env.close()


def flip_byte(txn, key: bytes, at: int) -> None:
    value = bytearray(txn.get(key))
    value[at] ^= 0x01
    txn.put(key, bytes(value))


@pytest.fixture(scope="module")
def packed(tmp_path_factory) -> Path:
    """A photo tree with both splits packed (ROOT/lmdb/{train,val})."""
    root = photo_tree(tmp_path_factory.mktemp("packed"))
    for split in ("train", "val"):
        pack_lmdb(root, split, progress=False, log=lambda m: None)
    return root


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory) -> tuple[Path, Path]:
    """A tiny digits run (its last.pt) and the teacher cache it filled."""
    tmp = tmp_path_factory.mktemp("digits_run")
    from wsld.cli import main

    assert main(["train", *DIGITS, f"model.teacher_cache={tmp / 'cache'}", "--out", str(tmp / "run")]) == 0
    return tmp / "run", tmp / "cache"


@pytest.fixture(scope="module")
def digits_store(digits_run, tmp_path_factory) -> Path:
    _, cache = digits_run
    store = tmp_path_factory.mktemp("digits_store") / "store"
    from wsld.cli import main

    assert main(["soft-labels", *DIGITS, f"model.teacher_cache={cache}", "--crops", "1", "--out", str(store)]) == 0
    return store


def copy_lmdb(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


# --- F7: a truncated or corrupted data.mdb ------------------------------------------------------


def test_truncated_lmdb_is_one_line_for_verify_and_train(packed, tmp_path):
    data = copy_lmdb(packed / "lmdb", tmp_path / "lmdb")
    mdb = data / "train" / "data.mdb"
    os.truncate(mdb, mdb.stat().st_size // 2)  # a copy that ran out of space
    p = run("data", "verify", data / "train", "--no-progress")
    assert p.returncode == 2, (p.returncode, p.stderr[-2000:])  # not -7 (SIGBUS)
    line = error_line(p.stderr)
    assert "truncated" in line and str(mdb) in line and "wsld data pack" in line and "--overwrite" in line
    # a folder of LMDBs: the damaged one is reported, the other split still checked
    p = run("data", "verify", data, "--no-progress")
    assert p.returncode == 1, p.stderr[-2000:]
    assert "truncated" in p.stdout and "val (wsld LMDB" in p.stdout and "Traceback" not in p.stderr
    p = run("train", *photo_args(data, tmp_path / "cache"), "--out", tmp_path / "run")
    assert p.returncode == 2, (p.returncode, p.stderr[-2000:])
    assert "truncated" in error_line(p.stderr)
    # resuming the pack into it is refused the same way; --overwrite packs it again
    p = run("data", "pack", packed, "--split", "train", "--out", data / "train", "--no-progress")
    assert p.returncode == 2 and "truncated" in error_line(p.stderr), p.stderr[-2000:]
    p = run("data", "pack", packed, "--split", "train", "--out", data / "train", "--no-progress", "--overwrite")
    assert p.returncode == 0, p.stderr[-2000:]
    assert run("data", "verify", data / "train", "--no-progress").returncode == 0


def test_corrupted_lmdb_page_is_one_line(packed, tmp_path):
    data = copy_lmdb(packed / "lmdb", tmp_path / "lmdb")
    mdb = data / "train" / "data.mdb"
    raw = bytearray(mdb.read_bytes())
    psize = struct.unpack_from("<I", raw, 40)[0]
    metas = [struct.unpack_from("<QQ", raw, off + 136) for off in (0, psize)]  # (last page, txn id) per meta page
    newest = 0 if metas[0][1] >= metas[1][1] else psize
    root = struct.unpack_from("<Q", raw, newest + 128)[0]  # the main database's root page
    raw[root * psize : root * psize + 16] = bytes(range(200, 216))  # random bytes over its header
    mdb.write_bytes(bytes(raw))
    p = run("data", "verify", data / "train", "--no-progress")
    assert p.returncode == 2, (p.returncode, p.stderr[-2000:])
    line = error_line(p.stderr)
    assert "is damaged" in line and str(data / "train") in line and "MDB_" in line


def test_truncated_store_is_one_line(digits_store, digits_run, tmp_path):
    store = copy_lmdb(digits_store, tmp_path / "store")
    mdb = store / "data.mdb"
    os.truncate(mdb, mdb.stat().st_size // 2)
    p = run("train", *DIGITS, f"model.teacher_cache={digits_run[1]}", f"distill.soft_labels={store}", "--out", tmp_path / "r")
    assert p.returncode == 2, (p.returncode, p.stderr[-2000:])
    line = error_line(p.stderr)
    assert "truncated" in line and "wsld soft-labels" in line


# --- G3: flipped bytes in a store, G4: in packed records and PNGs, records moved between classes -----


def test_flipped_byte_in_a_store_record_is_refused(digits_store, digits_run, tmp_path, capsys):
    store = copy_lmdb(digits_store, tmp_path / "store")
    rewrite(store, lambda txn: flip_byte(txn, image_key(5), 9))
    rc, _, err = wsld(capsys, "train", *DIGITS, f"model.teacher_cache={digits_run[1]}", f"distill.soft_labels={store}",
                      "--out", tmp_path / "r")  # fmt: skip
    assert rc == 2, err[-2000:]
    line = error_line(err)
    assert "image 5 are damaged" in line and "checksum" in line
    rc, out, _ = wsld(capsys, "data", "verify", store, "--no-progress")
    assert rc == 1
    assert f"ERROR {store}[5]: records damaged (checksum mismatch)" in out
    assert wsld(capsys, "data", "verify", digits_store, "--no-progress")[0] == 0
    swapped = copy_lmdb(digits_store, tmp_path / "swapped")  # two images' values exchanged: each is intact

    def swap(txn):
        a, b = txn.get(image_key(3)), txn.get(image_key(4))
        txn.put(image_key(3), b)
        txn.put(image_key(4), a)

    rewrite(swapped, swap)
    rc, out, _ = wsld(capsys, "data", "verify", swapped, "--no-progress")
    assert rc == 1 and out.count("records damaged (checksum mismatch)") == 2


def test_moved_and_flipped_lmdb_records_do_not_train(packed, tmp_path, capsys):
    data = copy_lmdb(packed / "lmdb", tmp_path / "lmdb")

    def damage(txn):
        cat, dog = txn.get(record_key(0)), txn.get(record_key(3))  # cat/0.jpg and dog/0.jpg
        txn.put(record_key(0), dog)
        txn.put(record_key(3), cat)
        flip_byte(txn, record_key(1), -40)  # a byte of cat/1.jpg's image

    rewrite(data / "train", damage)
    rc, out, _ = wsld(capsys, "data", "verify", data / "train", "--no-progress")
    assert rc == 1
    assert out.count("disagrees with the metadata label") == 2 and "checksum mismatch" in out
    rc, _, err = wsld(capsys, "train", *photo_args(data, tmp_path / "cache"), "data.on_corrupt=stop", "--out", tmp_path / "r")
    assert rc == 2, err[-2000:]
    assert "disagrees with the metadata label" in error_line(err)
    # skipped, not trained under the wrong label, with the default data.on_corrupt=skip
    rc, _, err = wsld(capsys, "train", *photo_args(data, tmp_path / "cache"), "--out", tmp_path / "r2")
    assert rc == 0, err[-2000:]
    assert json.loads((tmp_path / "r2" / "summary.json").read_text())["corrupt_images"] >= 1  # batches drop the rest


def test_flipped_byte_in_a_png_is_found_by_verify(tmp_path, capsys):
    root = photo_tree(tmp_path / "d")
    png = root / "train" / "cat" / "9.png"
    photo(7, 40, 30).save(png, format="PNG")
    raw = bytearray(png.read_bytes())
    raw[raw.index(b"IEND") - 5] ^= 0x01  # a byte of the image data chunk's CRC: Pillow still decodes it
    png.write_bytes(bytes(raw))
    Image.open(png).load()
    rc, out, _ = wsld(capsys, "data", "verify", root / "train", "--no-progress")
    assert rc == 1
    assert "ERROR train/cat/9.png" in out and "fails its CRC-32" in out


# --- G6: names that look like the list's comment or header syntax --------------------------------


def test_class_names_like_list_comments_are_images(tmp_path, capsys):
    root = photo_tree(tmp_path / "d", classes=("# notes", "# root: x", "cat"), per_class=2)
    assert wsld(capsys, "data", "list", root)[0] == 0
    rc, out, err = wsld(capsys, "data", "verify", root / "train_list.txt", "--no-progress")
    assert rc == 0, err
    assert "6 images in 3 classes, 6 usable" in out
    rc, _, err = wsld(capsys, "train", *photo_args(root, tmp_path / "cache", "list"), "--out", tmp_path / "r")
    assert rc == 0, err[-2000:]


# --- G5: two packs, two stores into one folder ---------------------------------------------------


def test_second_pack_into_the_same_folder_is_refused_at_once(tmp_path, capsys):
    root = photo_tree(tmp_path / "d")
    out = tmp_path / "out"
    paused, resume = threading.Event(), threading.Event()
    result = {}

    def first() -> None:
        def on_commit(n: int) -> None:
            paused.set()
            assert resume.wait(60)

        result["first"] = pack_lmdb(root, "train", out, progress=False, log=lambda m: None, commit_items=1,
                                    _on_commit=on_commit)  # fmt: skip

    t = threading.Thread(target=first)
    t.start()
    try:
        assert paused.wait(60)
        before = sorted(os.listdir(out))
        rc, _, err = wsld(capsys, "data", "pack", root, "--split", "train", "--out", out, "--no-progress")
        assert rc == 2
        assert f"in use by another wsld process (pid {os.getpid()})" in error_line(err)
        assert sorted(os.listdir(out)) == before
    finally:
        resume.set()
        t.join(60)
    assert result["first"].count == 6
    assert LOCK_NAME not in os.listdir(out)
    assert wsld(capsys, "data", "verify", out, "--no-progress")[0] == 0


def test_second_soft_labels_into_the_same_folder_is_refused_at_once(digits_run, tmp_path, capsys):
    """The first process takes the folder, then waits for its teacher (a cache entry this test holds
    locked): the second, started meanwhile, is refused at once with the first one's pid."""
    from wsld.config import load_config
    from wsld.locks import DirLock
    from wsld.teachers.training import teacher_cache_dir

    _, trained = digits_run
    cache = tmp_path / "cache"
    out = tmp_path / "store"
    args = ["soft-labels", *DIGITS, f"model.teacher_cache={cache}", "--crops", "2", "--out", str(out)]
    entry = teacher_cache_dir(load_config(None, [a for a in args if "=" in a]))
    entry.mkdir(parents=True)
    teacher_lock = DirLock(entry)
    assert teacher_lock.try_acquire()
    first = subprocess.Popen([*WSLD, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=sub_env())
    try:
        deadline = time.monotonic() + 60
        while not (out / LOCK_NAME).is_file() or not (out / LOCK_NAME).read_text().strip():
            assert first.poll() is None, first.communicate()
            assert time.monotonic() < deadline
            time.sleep(0.01)
        rc, _, err = wsld(capsys, *args)
        assert rc == 2
        assert f"in use by another wsld process (pid {first.pid})" in error_line(err)
        shutil.copy(next(trained.glob("*/teacher.safetensors")), entry / "teacher.safetensors")  # "trained" meanwhile
    finally:
        teacher_lock.release()
        _, first_err = first.communicate(timeout=120)
    assert first.returncode == 0, first_err[-2000:]
    assert sorted(os.listdir(out)) == ["data.mdb", "lock.mdb"]


# --- F6: a full disk -----------------------------------------------------------------------------


def test_full_disk_is_one_line_for_pack_soft_labels_and_export(tmpfs, digits_run, tmp_path):
    run_dir, cache = digits_run
    root = photo_tree(tmp_path / "d", per_class=8)
    small = tmpfs("size=48k")
    p = run("data", "pack", root, "--split", "train", "--out", small / "train", "--no-progress")
    assert p.returncode == 2, (p.returncode, p.stderr[-2000:])
    assert "the disk is full" in error_line(p.stderr)
    assert set(os.listdir(small / "train")) <= {"data.mdb", "lock.mdb"}  # the resumable pack, no lock, no temp file

    small = tmpfs("size=40k")
    p = run("soft-labels", *DIGITS, f"model.teacher_cache={cache}", "--crops", "4", "--out", small / "store")
    assert p.returncode == 2, (p.returncode, p.stderr[-2000:])
    assert "the disk is full" in error_line(p.stderr)
    assert set(os.listdir(small / "store")) <= {"data.mdb", "lock.mdb"}

    small = tmpfs("size=12k")
    p = run("export", run_dir / "last.pt", "--format", "torchscript", "--out", small / "student.pt")
    assert p.returncode == 2, (p.returncode, p.stderr[-2000:])  # was a C++ abort (134)
    assert "cannot write" in error_line(p.stderr)
    assert os.listdir(small) == []


# --- G8: a checkpoint naming code to import ------------------------------------------------------


def test_eval_and_export_import_a_checkpoints_module_only_when_asked(digits_run, tmp_path, monkeypatch, capsys):
    run_dir, _ = digits_run
    marker = tmp_path / "imported"
    (tmp_path / "evilmod.py").write_text(
        f"from pathlib import Path\nPath({str(marker)!r}).write_text('ran')\n"
        "from wsld.models import CNNStudent\n\ndef build(num_classes, in_channels=1):\n"
        "    return CNNStudent(num_classes, in_channels)\n"
    )
    ck = load_checkpoint(run_dir / "last.pt")
    ck["student_arch"] = ck["config"]["model"]["student"] = "evilmod:build"
    named = tmp_path / "named.pt"
    save_checkpoint({k: v for k, v in ck.items() if k != "format"}, named)
    monkeypatch.chdir(tmp_path)
    for argv in (["eval", named], ["export", named, "--format", "safetensors", "--out", tmp_path / "s.safetensors"]):
        rc, _, err = wsld(capsys, *argv)
        assert rc == 2
        line = error_line(err)
        assert "would import module 'evilmod'" in line and "--allow-import" in line
        assert not marker.exists()
    rc, out, err = wsld(capsys, "eval", named, "--allow-import")
    assert rc == 0, err[-2000:]
    assert marker.exists() and "top-1" in out


# --- item 9: the store's default place, and verify meeting a store --------------------------------


def test_default_store_is_outside_the_lmdb_folder_and_verify_checks_it_and_moves_on(packed, tmp_path, capsys):
    root = tmp_path / "d"
    shutil.copytree(packed, root)
    args = photo_args(root / "lmdb", tmp_path / "cache")
    rc, out, err = wsld(capsys, "soft-labels", *args, "--crops", "1")
    assert rc == 0, err[-2000:]
    store = root / "soft_labels" / "train_cifar_resnet20_s2_K1_top10"
    assert (store / "data.mdb").is_file(), out
    assert sorted(os.listdir(root / "lmdb")) == ["train", "val"]
    shutil.copytree(store, root / "lmdb" / "train_soft_labels")  # where older versions put it
    rc, out, err = wsld(capsys, "data", "verify", root / "lmdb", "--no-progress")
    assert rc == 0, out + err
    assert "train_soft_labels (wsld soft-label store" in out
    assert "train (wsld LMDB" in out and "val (wsld LMDB" in out
