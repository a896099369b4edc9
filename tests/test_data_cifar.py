"""CIFAR-10/100 read from files written in the exact download formats (Python-2 pickles, binary
records), through the public build path and the CLI; a hostile pickle is refused; the benchmark's
config starts and finishes on a tiny CIFAR-100 folder in torchvision's layout."""

from __future__ import annotations

import os
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
from engine_helpers import REPO, records, run_cli
from omegaconf import OmegaConf

from wsld.config import load_config
from wsld.data.build import build_datasets
from wsld.errors import DataError

CONFIG = REPO / "configs" / "cifar100_resnet32x4_resnet8x4_wsld.yaml"


class Py2Pickler(pickle._Pickler):  # the pure-Python pickler, so its dispatch table can be changed
    """Writes what Python 2's cPickle wrote for CIFAR: every str/bytes as a Python-2 ``str``
    (BINSTRING), read back as bytes with ``encoding='bytes'``; numpy's old module name."""

    dispatch = dict(pickle._Pickler.dispatch)

    def save_py2_str(self, obj):
        data = obj if isinstance(obj, bytes) else obj.encode("latin1")
        if len(data) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(data)]) + data)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(data)) + data)
        self.memoize(obj)

    dispatch[bytes] = save_py2_str
    dispatch[str] = save_py2_str


def py2_pickle(obj, path: Path, numpy_module: str = "numpy.core.multiarray") -> None:
    import io

    buf = io.BytesIO()
    Py2Pickler(buf, protocol=2).dump(obj)
    raw = buf.getvalue().replace(b"cnumpy._core.multiarray\n", f"c{numpy_module}\n".encode())
    assert b"_codecs" not in raw  # no Python-3 bytes encoding: the stream is what Python 2 wrote
    path.write_bytes(raw)


def fake_split(n: int, classes: int, seed: int) -> tuple[np.ndarray, list[int]]:
    rng = np.random.default_rng(seed)
    labels = [i % classes for i in range(n)]  # every class present, deterministic
    return rng.integers(0, 256, (n, 3072), dtype=np.uint8), labels


def write_cifar100_py(root: Path, n_train: int = 24, n_test: int = 12) -> tuple[Path, dict]:
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    out = {}
    for split, n, seed in (("train", n_train, 0), ("test", n_test, 1)):
        data, fine = fake_split(n, 100, seed)
        out[split] = (data, fine)
        py2_pickle({b"filenames": [b"img_%d.png" % i for i in range(n)], b"batch_label": b"%s batch" % split.encode(),
                    b"fine_labels": fine, b"coarse_labels": [y // 5 for y in fine], b"data": data}, folder / split)  # fmt: skip
    names = [b"class_%02d" % i for i in range(100)]
    py2_pickle({b"fine_label_names": names, b"coarse_label_names": [b"super_%d" % i for i in range(20)]}, folder / "meta")
    return folder, out


def write_cifar10_py(root: Path, per_batch: int = 4, n_test: int = 6) -> tuple[Path, dict]:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    train = []
    for i in range(1, 6):
        data, labels = fake_split(per_batch, 10, 10 + i)
        train.append((data, labels))
        # numpy 2's module name in one file: both spellings are numpy's array reconstruction
        py2_pickle({b"batch_label": b"training batch %d of 5" % i, b"labels": labels, b"data": data,
                    b"filenames": [b"f%d" % j for j in range(per_batch)]}, folder / f"data_batch_{i}",
                   numpy_module="numpy._core.multiarray" if i == 5 else "numpy.core.multiarray")  # fmt: skip
    data, labels = fake_split(n_test, 10, 99)
    py2_pickle({b"batch_label": b"testing batch 1 of 1", b"labels": labels, b"data": data}, folder / "test_batch")
    names = [b"airplane", b"automobile", b"bird", b"cat", b"deer", b"dog", b"frog", b"horse", b"ship", b"truck"]
    py2_pickle({b"label_names": names, b"num_cases_per_batch": per_batch, b"num_vis": 3072}, folder / "batches.meta")
    return folder, {"train": (np.concatenate([d for d, _ in train]), sum((y for _, y in train), [])), "test": (data, labels)}


def _cfg(dataset: str, path: Path, *extra: str):
    return load_config(None, [f"data.dataset={dataset}", "data.format=builtin", f"data.data_path={path}", *extra])


def _check(train, val, info, expected: dict, classes: int) -> None:
    for ds, split in ((train, "train"), (val, "test")):
        data, labels = expected[split]
        assert len(ds) == len(labels) and ds.targets == labels
        assert ds.images.shape == (len(labels), 3, 32, 32)
        assert (ds.images.reshape(len(labels), -1).numpy() == data).all()  # channel-major planes kept in order
    assert info.num_classes == classes and info.in_channels == 3 and info.image_size == 32 and len(info.mean) == 3


@pytest.mark.parametrize("point_at", ["parent", "folder"])
def test_cifar100_python_version_via_the_builtin_format(tmp_path, point_at):
    folder, expected = write_cifar100_py(tmp_path)
    train, val, info = build_datasets(_cfg("cifar100", tmp_path if point_at == "parent" else folder).data)
    _check(train, val, info, expected, 100)
    assert info.classes[0] == "class_00" and info.classes[99] == "class_99"
    assert info.mean == pytest.approx([0.5071, 0.4865, 0.4409])
    img, label = val[3]
    assert label == expected["test"][1][3] and img.shape == (3, 32, 32)
    assert (img.reshape(-1).numpy() == expected["test"][0][3]).all()  # val: no augmentation


def test_cifar10_python_version_and_the_crd_augmentation(tmp_path):
    _, expected = write_cifar10_py(tmp_path)
    train, val, info = build_datasets(_cfg("cifar10", tmp_path).data)
    _check(train, val, info, expected, 10)
    assert info.classes[:2] == ["airplane", "automobile"]
    # train: a 32x32 crop of the image padded by 4 zero pixels, maybe flipped; fixed by the sample seed
    a, _ = train[(0, 123)]
    b, _ = train[(0, 123)]
    assert a.shape == (3, 32, 32) and (a == b).all()
    original = train.images[0]
    shifted = [k for k in range(200) if not (train[(0, k)][0] == original).all()]
    assert shifted, "augmentation never changed the image"


def test_binary_versions(tmp_path):
    c10 = tmp_path / "c10" / "cifar-10-batches-bin"
    c10.mkdir(parents=True)
    data, labels = fake_split(5, 10, 3)
    for i in range(1, 6):
        (c10 / f"data_batch_{i}.bin").write_bytes(b"".join(bytes([y]) + row.tobytes() for y, row in zip(labels, data)))
    (c10 / "test_batch.bin").write_bytes(b"".join(bytes([y]) + row.tobytes() for y, row in zip(labels[:3], data[:3])))
    (c10 / "batches.meta.txt").write_text("\n".join(f"c{i}" for i in range(10)) + "\n\n")  # the real file ends in blank lines
    train, val, info = build_datasets(_cfg("cifar10", tmp_path / "c10").data)
    assert len(train) == 25 and train.targets[:5] == labels and info.classes == [f"c{i}" for i in range(10)]
    assert (val.images.reshape(3, -1).numpy() == data[:3]).all() and val.targets == labels[:3]

    c100 = tmp_path / "c100" / "cifar-100-binary"
    c100.mkdir(parents=True)
    data, fine = fake_split(7, 100, 4)
    record = lambda ys, rows: b"".join(bytes([y // 5, y]) + r.tobytes() for y, r in zip(ys, rows))  # noqa: E731
    (c100 / "train.bin").write_bytes(record(fine, data))
    (c100 / "test.bin").write_bytes(record(fine[:2], data[:2]))
    (c100 / "fine_label_names.txt").write_text("\n".join(f"f{i}" for i in range(100)) + "\n")
    train, val, info = build_datasets(_cfg("cifar100", c100).data)
    assert train.targets == fine and val.targets == fine[:2] and info.num_classes == 100  # the fine label, not the coarse
    assert (train.images.reshape(7, -1).numpy() == data).all()


class Hostile:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_hostile_pickle_is_refused_through_the_cli(tmp_path):
    folder, _ = write_cifar100_py(tmp_path)
    marker = tmp_path / "pwned"
    (folder / "train").write_bytes(pickle.dumps({b"data": Hostile(marker), b"fine_labels": []}, protocol=4))
    rc, out, err = run_cli(["train", str(REPO / "configs" / "cifar100_resnet56_resnet20_ce.yaml"), f"data.data_path={tmp_path}",
                            "data.workers=0", "train.progress=false", f"--out={tmp_path / 'run'}"])  # fmt: skip
    assert rc == 2, err
    line = err.strip()
    assert "\n" not in line and "Traceback" not in err
    assert str(folder / "train") in line and "system" in line and "not a CIFAR file" in line
    assert not marker.exists()


@pytest.mark.parametrize(
    "setup, message",
    [
        ("empty", "no cifar100 files in"),
        ("no_meta", "has no meta"),
        ("no_test", "lacks test"),
        ("truncated", "not a readable CIFAR pickle"),
        ("wrong_shape", "uint8 array of N x 3072"),
        ("bad_label", "label 100 is outside 0..99"),
        ("bad_binary", "not a multiple of 3074-byte records"),
    ],
)  # fmt: skip
def test_wrong_or_missing_files_are_one_line(tmp_path, setup, message):
    if setup == "bad_binary":
        folder = tmp_path / "cifar-100-binary"
        folder.mkdir()
        (folder / "train.bin").write_bytes(b"\0" * 3075)
        (folder / "test.bin").write_bytes(b"\0" * 3074)
        (folder / "fine_label_names.txt").write_text("\n".join(map(str, range(100))))
    elif setup != "empty":
        folder, _ = write_cifar100_py(tmp_path)
        if setup == "no_meta":
            (folder / "meta").unlink()
        elif setup == "no_test":
            (folder / "test").unlink()
        elif setup == "truncated":
            (folder / "train").write_bytes((folder / "train").read_bytes()[:100])
        elif setup == "wrong_shape":
            py2_pickle({b"data": np.zeros((2, 1024), np.uint8), b"fine_labels": [0, 1]}, folder / "train")
        elif setup == "bad_label":
            py2_pickle({b"data": np.zeros((1, 3072), np.uint8), b"fine_labels": [100]}, folder / "train")
    with pytest.raises(DataError) as e:
        build_datasets(_cfg("cifar100", tmp_path).data)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_data_path_is_required(tmp_path):
    with pytest.raises(DataError, match="data.data_path is required for cifar10.*cifar-10-batches-py/"):
        build_datasets(load_config(None, ["data.dataset=cifar10"]).data)


def test_benchmark_config_starts_and_finishes_on_torchvision_layout(tmp_path):
    """The issue's command with tiny overrides: a small teacher, one epoch each, 12 images."""
    write_cifar100_py(tmp_path / "data", n_train=12, n_test=6)
    rc, out, err = run_cli(
        ["train", str(CONFIG), f"data.data_path={tmp_path / 'data'}",
         "model.teacher=cifar_resnet8", "train.epochs=1", "teacher_train.epochs=1", "data.batch_size=12",
         "data.workers=0", "train.progress=false", f"model.teacher_cache={tmp_path / 'cache'}",
         "distill.allow_weak_teacher=true",  # random pixels: the plumbing is tested, not accuracy
         "--out", str(tmp_path / "run")]
    )  # fmt: skip
    assert rc == 0, err
    kinds = [r["kind"] for r in records(tmp_path / "run")]
    assert "teacher_eval" in kinds and kinds.count("eval") == 1
    assert "cifar_resnet8x4 on cifar100 (12 train / 6 val, 100 classes), loss=wsld" in err
    ran = OmegaConf.load(tmp_path / "run" / "config.yaml")  # the benchmark's recipe, with only the overrides changed
    assert ran.train.schedule == "multistep" and list(ran.train.milestones) == [150, 180, 210]
    assert ran.train.base_batch_size == 64 and ran.train.lr == 0.05 and ran.distill.T == 4.0
    assert ran.distill.params.wsld.alpha == 2.25 and ran.teacher_train.lr == 0.05
