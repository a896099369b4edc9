"""data.decode=gpu run with device="cpu": same crop boxes as the CPU path, pixels within 1 grey level."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import Tensor
from torch.utils.data import DataLoader

from data_fixtures import encode, photo
from wsld.config import Config, validate
from wsld.data.build import SubsetWithTargets
from wsld.data.batch import Batch
from wsld.data.datasets import CorruptSample, build_image_datasets
from wsld.data.gpu_decode import (EncodedBatch, EncodedPhotoDataset, GpuDecoder, collate_encoded, encoded_view,
                                  resolve_decode)  # fmt: skip
from wsld.data.sampling import ResumableSampler, sample_seed
from wsld.errors import DataError, UserError
from wsld.soft_labels.crops import crop_params
from wsld.soft_labels.replay import ReplayDataset
from wsld.soft_labels.store import record_dtype

SIZE, VAL_RESIZE = 64, 73
RAW = ([0.0] * 3, [1.0 / 255] * 3)  # mean/std for which the decoder's output is the pixel values themselves
# (file, bytes) of the train split: photo JPEGs of several shapes (the device decodes them) and the
# files the workers decode on the CPU (PNG, a PNG named .JPEG, CMYK) or report (truncated)
DEVICE_FILES = ["a/big.jpg", "a/tall.jpg", "a/gray.jpg", "a/wide.jpg", "b/p1.jpg", "b/p2.jpg", "b/small.jpg"]
CPU_FILES = ["b/cmyk.jpg", "b/n.png", "b/png_named.JPEG"]


def _files() -> dict[str, bytes]:
    jpeg = lambda i, w, h, **kw: encode(photo(i, w, h), "JPEG", quality=90, **kw)  # noqa: E731
    return {
        "train/a/big.jpg": jpeg(1, 500, 375), "train/a/tall.jpg": jpeg(2, 150, 260), "train/a/wide.jpg": jpeg(3, 320, 120),
        "train/a/gray.jpg": encode(photo(4, 200, 150).convert("L"), "JPEG", quality=90),
        "train/b/p1.jpg": jpeg(5, 240, 180, progressive=True), "train/b/p2.jpg": jpeg(6, 200, 200, subsampling=0),
        "train/b/small.jpg": jpeg(7, 60, 50), "train/b/cmyk.jpg": encode(photo(8, 160, 120).convert("CMYK"), "JPEG"),
        "train/b/n.png": encode(photo(9, 130, 100), "PNG"), "train/b/png_named.JPEG": encode(photo(10, 100, 90), "PNG"),
        "train/b/truncated.jpg": jpeg(11, 200, 150)[:1500],
        "val/a/v1.jpg": jpeg(20, 300, 200), "val/a/v2.jpg": jpeg(21, 90, 140), "val/b/v3.png": encode(photo(22, 120, 90), "PNG"),
    }  # fmt: skip


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("photos")
    for rel, data in _files().items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return root


def _datasets(root: Path, **kw):
    cfg = Config().data
    for k, v in {**dict(format="folder", data_path=str(root), image_size=SIZE, val_resize=VAL_RESIZE, fast_decode=False), **kw}.items():
        setattr(cfg, k, v)
    return build_image_datasets(cfg)


def _paths(ds) -> list[str]:
    return [ds.describe(i).split("/train/")[-1].split("/val/")[-1] for i in range(len(ds))]


def _compare(cpu_ds, keys, decoder: GpuDecoder) -> tuple[Batch, Tensor, Tensor]:
    """Decode ``keys`` both ways: (device-path batch, its pixels, the CPU path's pixels of the same rows)."""
    enc_ds = EncodedPhotoDataset(cpu_ds)
    batch = decoder(collate_encoded([enc_ds[k] for k in keys]))
    cpu = [cpu_ds[k] for k in keys]
    ref = torch.stack([c[0] for c in cpu if not isinstance(c, CorruptSample)]).float()
    return batch, batch.images, ref


def test_train_crops_are_the_cpu_paths_boxes_and_pixels(root):
    train, _ = _datasets(root)
    paths = _paths(train)
    keys = [(i, sample_seed(3, e, i)) for e in range(4) for i in range(len(train)) if paths[i] != "b/truncated.jpg"]
    enc = EncodedPhotoDataset(train)
    for i, seed in keys:
        item = enc[(i, seed)]
        if paths[i] in DEVICE_FILES:  # 1-D packed sample: its plan is the soft-label store's box and flip
            top, left, h, w, rh, rw, flip = item[0][:40].view(torch.int32).tolist()[:7]
            assert (top, left, h, w, flip) == tuple(crop_params(train, i, seed)), paths[i]
            assert (rh, rw) == (SIZE, SIZE)
        else:  # decoded by the CPU path in the worker: its very pixels
            assert paths[i] in CPU_FILES and item[0].dim() == 3 and torch.equal(item[0], train[(i, seed)][0])
    decoder = GpuDecoder(*RAW, SIZE, "cpu")
    batch, got, ref = _compare(train, keys, decoder)
    assert got.shape == ref.shape == (len(keys), 3, SIZE, SIZE) and torch.equal(batch.targets, torch.tensor([train.targets[i] for i, _ in keys]))
    diff = (got - ref).abs()
    assert diff.max() <= 1 and diff.mean() < 0.1, (diff.max(), diff.mean())  # float vs fixed-point uint8 resize
    n_device = sum(paths[i] in DEVICE_FILES for i, _ in keys)
    assert decoder.stats.as_dict() == {"device": n_device, "cpu_worker": len(keys) - n_device, "cpu_main": 0, "corrupt": 0}


def test_val_is_resize_then_centre_crop_as_the_cpu_path(root):
    _, val = _datasets(root)
    keys = list(range(len(val)))
    enc = EncodedPhotoDataset(val)
    plan = enc[0][0][:40].view(torch.int32).tolist()
    assert plan[:7] == [0, 0, 200, 300, VAL_RESIZE, VAL_RESIZE * 3 // 2, 0]  # the whole image, shorter side to 73
    decoder = GpuDecoder(*RAW, SIZE, "cpu")
    _, got, ref = _compare(val, keys, decoder)
    diff = (got - ref).abs()
    assert diff.max() <= 1 and diff.mean() < 0.1, (diff.max(), diff.mean())
    assert decoder.stats.device == 2 and decoder.stats.cpu_worker == 1


def test_fast_decode_changes_pixels_not_boxes(root):
    """The CPU path's DCT-domain downscale (data.fast_decode) is what the device path does not do."""
    fast, _ = _datasets(root, fast_decode=True)
    paths = _paths(fast)
    keys = [(i, sample_seed(0, e, i)) for e in range(3) for i in range(len(fast)) if paths[i] == "a/big.jpg"]
    _, got, ref = _compare(fast, keys, GpuDecoder(*RAW, SIZE, "cpu"))
    diff = (got - ref).abs().mean(dim=(1, 2, 3))
    assert diff.max() > 1 and diff.mean() < 4, diff  # 500x375 crops at 64 px are decoded at 1/2-1/4 scale on the CPU


def test_normalised_channels_last_as_the_batch_normalizer(root):
    train, _ = _datasets(root)
    keys = [(i, 11) for i in range(len(train)) if _paths(train)[i] in DEVICE_FILES]
    mean, std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
    _, got, ref = _compare(train, keys, GpuDecoder(mean, std, SIZE, "cpu", channels_last=True))
    want = (ref - torch.tensor(mean).view(1, 3, 1, 1) * 255) / (torch.tensor(std).view(1, 3, 1, 1) * 255)
    assert got.is_contiguous(memory_format=torch.channels_last) and got.dtype == torch.float32
    assert (got - want).abs().max() <= 1 / (0.224 * 255) + 1e-5  # one grey level, normalised


def test_corrupt_images_are_set_aside_with_their_rows(root):
    train, _ = _datasets(root)
    paths = _paths(train)
    enc = EncodedPhotoDataset(train)
    truncated = enc[(paths.index("b/truncated.jpg"), 1)]
    assert isinstance(truncated, CorruptSample) and truncated == train[(paths.index("b/truncated.jpg"), 1)]
    # damaged after the workers' checks: garbage in the header (no decoder reads it), and a device
    # decode whose size disagrees with the header's (made so by editing the plan): redone on the CPU
    good = [enc[(paths.index(p), 2)] for p in ("a/big.jpg", "b/n.png", "a/gray.jpg")]
    start = 40 + int(good[0][0][:40].view(torch.int32)[9])
    head, resized = good[0][0].clone(), good[0][0].clone()
    head[start + 2 : start + 60] = 0x13
    resized[28:32] = torch.tensor([376], dtype=torch.int32).view(torch.uint8)  # plan field 7: image height
    store = np.zeros(5, dtype=record_dtype(3, 2))
    store["lse"] = [0, 1, 2, 3, 4]
    items = [(good[0][0], 0, store[0:1]), (good[1][0], 1, store[1:2]), (head, 1, store[2:3]), (good[2][0], 0, store[3:4]),
             (resized, 1, store[4:5])]  # fmt: skip
    decoder = GpuDecoder(*RAW, SIZE, "cpu")
    out = decoder(collate_encoded([*items, truncated]))
    assert out.targets.tolist() == [0, 1, 0, 1] and out.teacher_records["lse"].tolist() == [0, 1, 3, 4]
    assert out.images.shape == (4, 3, SIZE, SIZE) and torch.equal(out.images[1], good[1][0].float())
    assert torch.equal(out.images[3], out.images[0])
    assert [c.path.split("/train/")[-1] for c in out.corrupt] == ["b/truncated.jpg", "a/big.jpg"]
    assert decoder.stats.as_dict() == {"device": 2, "cpu_worker": 1, "cpu_main": 1, "corrupt": 1}
    with pytest.raises(DataError, match="corrupt image .*big.jpg"):
        GpuDecoder(*RAW, SIZE, "cpu", on_corrupt="stop")(collate_encoded([items[2][:2]]))


class _Store:
    """Just enough of a SoftLabelStore for ReplayDataset: a record holding the recorded box and flip."""

    def __init__(self, dataset, seed_of):
        self.dataset, self.seed_of = dataset, seed_of

    def record(self, index: int, crop: int) -> np.ndarray:
        rec = np.zeros(1, dtype=record_dtype(3, 2))
        *box, flip = crop_params(self.dataset, index, self.seed_of(index, crop))
        rec["box"], rec["flip"] = box, flip
        return rec


def test_replayed_store_records_line_up_with_the_device_rows(root):
    """Through ReplayDataset and a long-tail subset: each row's stored box is the box the decoder cropped."""
    train, _ = _datasets(root)
    subset = SubsetWithTargets(train, [i for i, p in enumerate(_paths(train)) if p in DEVICE_FILES + CPU_FILES])
    seed_of = lambda i, crop: sample_seed(5, crop, i)  # noqa: E731
    replay = ReplayDataset(encoded_view(subset), _Store(subset, seed_of))
    batch = collate_encoded([replay[(i, seed_of(i, 1), 1)] for i in range(len(subset))])
    enc = batch.encoded
    assert isinstance(enc, EncodedBatch) and len(enc.device_rows) == 7 and len(enc.pixel_rows) == 3
    recs = batch.teacher_records
    assert torch.equal(recs["box"][enc.device_rows], enc.plans[:, :4])
    assert torch.equal(recs["flip"][enc.device_rows].long(), enc.plans[:, 6])


def test_resumed_epoch_decodes_the_same_batches(root):
    """A run resumed at batch 1 (worker process this time) gets the uninterrupted epoch's batches."""
    train, _ = _datasets(root)
    enc = encoded_view(train)

    def batches(start: int, workers: int) -> list[Batch]:
        sampler = ResumableSampler(len(enc), batch_size=4, seed=9)
        sampler.set_epoch(2, start_batch=start)
        loader = DataLoader(enc, batch_size=4, sampler=sampler, num_workers=workers, collate_fn=GpuDecoder.collate)
        decoder = GpuDecoder(*RAW, SIZE, "cpu")
        return [decoder(b) for b in loader]

    full, resumed = batches(0, 0), batches(1, 1)
    assert len(resumed) == len(full) - 1
    for a, b in zip(full[1:], resumed):
        assert torch.equal(a.images, b.images) and torch.equal(a.targets, b.targets) and a.corrupt == b.corrupt


def test_resolve_decode(root, tmp_path):
    train, _ = _datasets(root)
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert resolve_decode("auto", cpu, train) == "cpu"
    assert resolve_decode("auto", cuda, train) == "cpu"  # PNGs among the probed samples
    assert resolve_decode("gpu", cpu, train) == "gpu"
    jpegs = tmp_path / "jpegs"
    for rel in ("train/a/big.jpg", "train/b/p1.jpg", "val/a/v1.jpg", "val/a/v2.jpg"):
        (jpegs / rel).parent.mkdir(parents=True, exist_ok=True)
        (jpegs / rel).write_bytes((root / rel).read_bytes())
    (jpegs / "val/b").mkdir()
    (jpegs / "val/b/v.jpg").write_bytes((root / "val/a/v1.jpg").read_bytes())
    only_jpegs, _ = _datasets(jpegs)
    assert resolve_decode("auto", cuda, only_jpegs) == "gpu"
    jitter, _ = _datasets(jpegs, color_jitter=0.4)
    assert resolve_decode("auto", cuda, jitter) == "cpu"
    with pytest.raises(UserError, match="color_jitter"):
        resolve_decode("gpu", cuda, jitter)
    with pytest.raises(UserError, match="photo data"):
        resolve_decode("gpu", cuda, torch.utils.data.TensorDataset(torch.zeros(2)))
    cfg = Config()
    cfg.data.decode = "nvjpeg"
    with pytest.raises(UserError, match="data.decode"):
        validate(cfg)


def test_bench_scripts_run_on_cpu(tmp_path):
    """bench/gpu_decode.py runs end to end with tiny sizes; bench/gpu_figures.sh parses."""
    repo = Path(__file__).resolve().parent.parent
    out = subprocess.run([sys.executable, str(repo / "bench" / "gpu_decode.py"), "--images", "4", "--image-size", "32",
                          "--batch-size", "4", "--repeats", "1", "--diff-sizes", "32", "--threads", "1",
                          "--workdir", str(tmp_path), "--out", str(tmp_path / "r.json")],
                         capture_output=True, text=True, timeout=300)  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    assert "train 32 px, fast_decode=False" in out.stdout and (tmp_path / "r.json").exists()
    assert subprocess.run(["bash", "-n", str(repo / "bench" / "gpu_figures.sh")]).returncode == 0
