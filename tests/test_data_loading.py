"""Photo datasets: one interface over folder / list / LMDB, seeded crops, corrupt-image policy."""

from __future__ import annotations

import io

import pytest
import torch
from data_fixtures import image_tree  # noqa: F401  (fixture)
from PIL import Image
from torch.utils.data import DataLoader

from wsld.config import DataConfig
from wsld.data.datasets import CorruptSample, build_image_datasets, collate_skip_corrupt
from wsld.data.images import EncodedImage
from wsld.data.lists import write_lists
from wsld.data.pack import pack_lmdb
from wsld.data.sampling import seeded_rng
from wsld.data.transforms import TrainTransform, ValTransform
from wsld.errors import DataError

SIZE = 32


@pytest.fixture(scope="module")
def sources(image_tree, tmp_path_factory):
    """DataConfigs for the same images as a folder, a list and an LMDB."""
    lists = tmp_path_factory.mktemp("lists")
    write_lists(image_tree.root, lists, log=lambda m: None)
    lmdb_root = tmp_path_factory.mktemp("lmdb")
    for split in ("train", "val"):
        pack_lmdb(image_tree.root, split, lmdb_root / split, progress=False, log=lambda m: None)
    common = dict(image_size=SIZE, val_resize=36)
    return {
        "folder": DataConfig(format="folder", data_path=str(image_tree.root), **common),
        "list": DataConfig(format="list", data_path=str(lists), **common),
        "lmdb": DataConfig(format="lmdb", data_path=str(lmdb_root), **common),
    }


def _same(a, b) -> bool:
    if isinstance(a, CorruptSample) or isinstance(b, CorruptSample):
        return isinstance(a, CorruptSample) and isinstance(b, CorruptSample) and a.error == b.error
    return a[1] == b[1] and torch.equal(a[0], b[0])


def test_same_samples_from_folder_list_lmdb(sources, image_tree):
    built = {k: build_image_datasets(cfg) for k, cfg in sources.items()}
    ref_train, ref_val = built["folder"]
    assert ref_train.classes == image_tree.classes
    n = len(image_tree.expected_train)
    for name, (train, val) in built.items():
        assert len(train) == n and train.targets == ref_train.targets and train.classes == ref_train.classes
        for i in range(n):
            a, b = ref_train[(i, 1000 + i)], train[(i, 1000 + i)]
            assert _same(a, b), (name, i)
        for i in range(len(val)):
            assert _same(ref_val[i], val[i]), (name, i)
    img, label = ref_train[(0, 7)]
    assert img.dtype == torch.uint8 and img.shape == (3, SIZE, SIZE) and label == 0
    assert torch.equal(ref_train[(0, 7)][0], img)  # a pure function of the seed
    assert not torch.equal(ref_train[(0, 8)][0], img)


def test_corrupt_skip_and_collate(sources, image_tree):
    train, _ = build_image_datasets(sources["lmdb"])
    batch = [train[(i, i)] for i in range(len(train))]
    bad = [b for b in batch if isinstance(b, CorruptSample)]
    assert sorted(b.path.split(" ", 1)[1] for b in bad) == sorted(image_tree.unusable)
    images, labels, corrupt = collate_skip_corrupt(batch)
    assert images.shape == (len(batch) - 2, 3, SIZE, SIZE) and images.dtype == torch.uint8
    assert labels.dtype == torch.int64 and len(corrupt) == 2
    good_labels = [b[1] for b in batch if not isinstance(b, CorruptSample)]
    assert labels.tolist() == good_labels  # no image takes another sample's label
    # plain (tensor, int) samples (built-in datasets) and all-corrupt batches
    imgs, labs, none = collate_skip_corrupt([(torch.zeros(1, 4, 4, dtype=torch.uint8), 3)])
    assert imgs.shape == (1, 1, 4, 4) and labs.tolist() == [3] and none == []
    imgs, labs, only = collate_skip_corrupt([CorruptSample("x", "bad")])
    assert imgs.shape[0] == 0 and labs.shape == (0,) and len(only) == 1


def test_corrupt_stop_raises_naming_the_file(sources):
    cfg = DataConfig(**{**sources["folder"].__dict__, "on_corrupt": "stop"})
    train, _ = build_image_datasets(cfg)
    i = next(i for i in range(len(train)) if "truncated" in train.describe(i))
    with pytest.raises(DataError, match=r"truncated\.JPEG.*truncated file"):
        train[(i, 0)]


def test_dataloader_workers_read_lmdb(sources):
    train, _ = build_image_datasets(sources["lmdb"])
    keys = [(i, 50 + i) for i in range(len(train))]
    loader = DataLoader(keys, batch_size=4, num_workers=2, collate_fn=lambda ks: collate_skip_corrupt(
        [train[k] for k in ks]))
    got = torch.cat([imgs for imgs, _, _ in loader])
    local = collate_skip_corrupt([train[k] for k in keys])[0]
    assert torch.equal(got, local)  # each worker opened its own LMDB; same crops as in-process


def test_crop_and_flip_match_torchvision(image_tree):
    from torchvision import transforms as T

    tv = T.Compose([T.RandomResizedCrop(48), T.RandomHorizontalFlip(), T.PILToTensor()])
    ours = TrainTransform(48, fast_decode=False)
    for k, rel in enumerate(["Zebra/z1.JPEG", "Zebra/z2.jpg", "apple/a1.jpg", "n01/n1.png"]):
        data = (image_tree.root / "train" / rel).read_bytes()
        with seeded_rng(k):
            want = tv(Image.open(io.BytesIO(data)).convert("RGB"))
        got = ours(EncodedImage(data), k)
        assert got.shape == want.shape
        assert (got.float() - want.float()).abs().mean() < 1.0  # same crop/flip; resamplers agree closely


def test_fast_decode_close_to_full(image_tree):
    data = (image_tree.root / "train" / "Zebra" / "z1.JPEG").read_bytes()  # 120x90
    fast, full = TrainTransform(16), TrainTransform(16, fast_decode=False)
    diffs = [(fast(EncodedImage(data), s).float() - full(EncodedImage(data), s).float()).abs().mean() for s in range(8)]
    assert max(diffs) < 12 and sum(diffs) / len(diffs) < 6  # DCT-domain downscale vs full decode + resize
    v = ValTransform(SIZE, 36)(EncodedImage(data))
    assert v.shape == (3, SIZE, SIZE) and v.dtype == torch.uint8


def test_grayscale_cmyk_png_become_rgb(image_tree):
    t = ValTransform(SIZE, 36)
    for rel in ["apple/gray.jpg", "apple/cmyk.JPEG", "n01/png_named.JPEG", "n01/zz.webp"]:
        out = t(EncodedImage((image_tree.root / "train" / rel).read_bytes()))
        assert out.shape == (3, SIZE, SIZE), rel
    gray = t(EncodedImage((image_tree.root / "train" / "apple" / "gray.jpg").read_bytes()))
    assert torch.equal(gray[0], gray[1]) and torch.equal(gray[1], gray[2])


def test_bad_config_and_paths(tmp_path, sources):
    with pytest.raises(DataError, match="data.data_path"):
        build_image_datasets(DataConfig(format="folder", data_path=str(tmp_path / "nope")))
    with pytest.raises(DataError, match="reference_labels"):
        build_image_datasets(DataConfig(**{**sources["lmdb"].__dict__, "reference_labels": "bogus"}))
    with pytest.raises(DataError, match="list file not found"):
        build_image_datasets(DataConfig(format="list", data_path=str(tmp_path)))
