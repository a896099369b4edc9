"""Offline soft labels end to end: crop replay, exact equality with online distillation when
k = classes, resumable/refusing store, photo data with corrupt images (the stored form itself:
test_soft_labels_exact.py; several processes: test_soft_labels_ddp.py)."""

from __future__ import annotations

import json
from pathlib import Path

import lmdb
import numpy as np
import pytest
import torch
from data_fixtures import image_tree  # noqa: F401  (fixture)
from PIL import Image
from torchvision.transforms.v2 import functional as F

from wsld.cli import main
from wsld.config import load_config
from wsld.data.build import build_datasets
from wsld.data.sampling import sample_seed
from wsld.soft_labels.crops import crop_params
from wsld.soft_labels.replay import ReplayDataset
from wsld.soft_labels.store import COMPLETE_KEY, SoftLabelStore, image_key

DIGITS = ["data.dataset=digits", "data.batch_size=128", "data.workers=0", "train.progress=false",
          "teacher_train.epochs=2", "teacher_train.lr=0.2", "train.log_every=1"]  # fmt: skip


@pytest.fixture(scope="module")
def digits_runs(tmp_path_factory):
    """A digits teacher, a 2-crop float32 top-10 (= all classes) store, an online and a cached run."""
    tmp = tmp_path_factory.mktemp("soft_labels")
    common = DIGITS + [f"model.teacher_cache={tmp / 'cache'}", "train.epochs=2"]
    store = tmp / "store"
    assert main(["soft-labels", *common, "--crops", "2", "--precision", "float32", "--out", str(store)]) == 0
    assert main(["train", *common, "--out", str(tmp / "online")]) == 0
    assert main(["train", *common, f"distill.soft_labels={store}", "--out", str(tmp / "cached")]) == 0
    return tmp, common, store


def _train_records(run: Path) -> list[dict]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == "train"]


def test_cached_training_reproduces_online_losses(digits_runs):
    tmp, _, _ = digits_runs
    online, cached = _train_records(tmp / "online"), _train_records(tmp / "cached")
    assert len(online) == len(cached) == 20  # 2 epochs x 10 steps, every step logged
    for a, b in zip(online, cached):
        for key in ("loss", "hard", "soft", "weight_mean"):
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-6), (a["global_step"], key)
    assert online[0]["soft"] > 0 and online[0]["weight_mean"] > 0
    s_on = json.loads((tmp / "online" / "summary.json").read_text())
    s_ca = json.loads((tmp / "cached" / "summary.json").read_text())
    assert s_ca["teacher"] is None  # no teacher model was built
    assert s_ca["last_top1"] == pytest.approx(s_on["last_top1"], abs=0.5)


def test_replayed_crop_equals_the_stored_box(digits_runs):
    _, common, store_path = digits_runs
    cfg = load_config(None, common + [f"distill.soft_labels={store_path}"])
    train, _, _ = build_datasets(cfg.data, seed=0)
    store = SoftLabelStore(store_path)
    replay = ReplayDataset(train, store)
    pad = 1  # digits: RandomCrop(8, padding=1), no flip
    seen_boxes = set()
    for i in range(0, len(train), 97):
        padded = torch.nn.functional.pad(train.images[i], (pad, pad, pad, pad))
        for epoch in range(4):  # epochs 2 and 3 replay crops 0 and 1 again
            k = epoch % store.crops
            img, label, rec = replay[(i, sample_seed(0, k, i), k)]
            top, left, h, w = (int(v) for v in rec["box"][0])
            want = padded[:, top + pad : top + pad + h, left + pad : left + pad + w]
            if rec["flip"][0]:
                want = want.flip(-1)
            assert torch.equal(img, want)
            assert label == train.targets[i]
            seen_boxes.add((top, left))
    assert len(seen_boxes) > 3  # the crops really move


def test_fashion_mnist_crop_params_with_flips():
    cfg = load_config(None, ["data.dataset=fashion-mnist"])
    train, _, _ = build_datasets(cfg.data, seed=0)
    flips = 0
    for i in range(12):
        seed = sample_seed(7, 3, i)
        top, left, h, w, flip = crop_params(train, i, seed)
        img, _ = train[(i, seed)]
        padded = torch.nn.functional.pad(train.images[i], (2, 2, 2, 2))
        want = padded[:, top + 2 : top + 2 + h, left + 2 : left + 2 + w]
        assert torch.equal(img, want.flip(-1) if flip else want)
        flips += flip
    assert 0 < flips < 12


def test_photo_crop_params_match_the_transform(image_tree):  # noqa: F811
    cfg = load_config(None, ["data.format=folder", f"data.data_path={image_tree.root}", "data.image_size=24",
                             "data.fast_decode=false"])  # fmt: skip
    train, _, _ = build_datasets(cfg.data, seed=0)
    good = [i for i in range(len(train)) if isinstance(train[i], tuple)]
    flips = 0
    for i in good[:5]:
        for k in range(3):
            seed = sample_seed(0, k, i)
            top, left, h, w, flip = crop_params(train, i, seed)
            img, _ = train[(i, seed)]
            src = torch.from_numpy(np.array(Image.open(train.describe(i)).convert("RGB"))).permute(2, 0, 1)
            want = F.resized_crop(src, top, left, h, w, [24, 24], antialias=True)
            if flip:
                want = want.flip(-1)
            assert (img.int() - want.int()).abs().max() <= 1  # same box; resize kernels may round differently
            flips += flip
    assert flips > 0


def test_padded_photo_crop_params_match_the_transform(image_tree):  # noqa: F811
    """train_crop=padded (the demo's mode): the box is in the val view's coordinates, offset by the padding."""
    cfg = load_config(None, ["data.format=folder", f"data.data_path={image_tree.root}", "data.image_size=16",
                             "data.val_resize=16", "data.train_crop=padded", "data.crop_padding=3",
                             "data.val_split=train"])  # fmt: skip
    train, val, _ = build_datasets(cfg.data, seed=0)  # val: the same training files, val transform
    good = [i for i in range(len(train)) if isinstance(train[i], tuple) and isinstance(val[i], tuple)]
    flips = 0
    for i in good[:4]:
        view = torch.nn.functional.pad(val[i][0], (3, 3, 3, 3))
        for k in range(4):
            seed = sample_seed(0, k, i)
            top, left, h, w, flip = crop_params(train, i, seed)
            img, _ = train[(i, seed)]
            want = view[:, top + 3 : top + 3 + h, left + 3 : left + 3 + w]
            assert torch.equal(img, want.flip(-1) if flip else want)
            flips += flip
    assert flips > 0


def _drop_completion_and(store: Path, indices: list[int]) -> None:
    env = lmdb.open(str(store))
    with env.begin(write=True) as txn:
        txn.delete(COMPLETE_KEY)
        for i in indices:
            txn.delete(image_key(i))
    env.close()


def test_incomplete_store_is_refused_then_resumed(digits_runs, tmp_path, capsys):
    import shutil

    tmp, common, store = digits_runs
    copy = tmp_path / "store"
    shutil.copytree(store, copy)
    _drop_completion_and(copy, [5, 6, 7])
    assert main(["train", *common, f"distill.soft_labels={copy}", "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "incomplete (1344 of 1347 images done)" in err and "wsld soft-labels" in err
    assert not (tmp_path / "run").exists()
    # a different setting may not finish it; the same command does, redoing only the missing images
    assert main(["soft-labels", *common, "--crops", "3", "--precision", "float32", "--out", str(copy)]) == 2
    assert "other crops" in capsys.readouterr().err
    assert main(["soft-labels", *common, "--crops", "2", "--precision", "float32", "--out", str(copy)]) == 0
    out = capsys.readouterr()
    assert "1344 of 1347 images already done, 3 to go" in out.err
    assert "1347 images (3 new)" in out.out and "per image" in out.out
    assert SoftLabelStore(copy).records(5).tobytes() == SoftLabelStore(store).records(5).tobytes()


def test_store_mismatch_and_bad_arguments(digits_runs, tmp_path, capsys):
    tmp, common, store = digits_runs
    assert main(["train", *common, f"distill.soft_labels={store}", "data.augment=false", "--out", str(tmp_path / "r")]) == 2
    assert "data.augment=True" in capsys.readouterr().err
    assert main(["train", *common, f"distill.soft_labels={tmp_path / 'nothing'}", "--out", str(tmp_path / "r")]) == 2
    assert "no soft-label store" in capsys.readouterr().err
    assert main(["soft-labels", *common, "--crops", "2"]) == 2
    assert "give --out" in capsys.readouterr().err
    assert main(["soft-labels", *common, "--crops", "0", "--out", str(tmp_path / "s")]) == 2
    assert main(["soft-labels", *common, "model.teacher_bn_mode=train", "--crops", "1", "--out", str(tmp_path / "s")]) == 2
    assert "teacher_bn_mode=eval" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()
    images = tmp_path / "images"  # an LMDB that is not a soft-label store is never written into
    env = lmdb.open(str(images))
    with env.begin(write=True) as txn:
        txn.put(b"0000000000", b"image bytes")
    env.close()
    assert main(["soft-labels", *common, "--crops", "1", "--out", str(images)]) == 2
    assert "not a soft-label store" in capsys.readouterr().err


def test_photo_folder_store_skips_corrupt_images(image_tree, tmp_path, capsys):  # noqa: F811
    common = [
        "data.format=folder", f"data.data_path={image_tree.root}", "data.image_size=16", "data.batch_size=13",
        "data.workers=0", "train.progress=false", "teacher_train.epochs=1", "train.epochs=1",
        f"model.teacher_cache={tmp_path / 'cache'}",
    ]  # fmt: skip
    store = tmp_path / "store"
    assert main(["soft-labels", *common, "--crops", "2", "--topk", "2", "--out", str(store)]) == 0
    out = capsys.readouterr()
    assert "2 unreadable images stored without crops" in out.out
    s = SoftLabelStore(store)
    empty = [i for i in range(s.meta["count"]) if len(s.records(i)) == 0]
    assert len(empty) == len(image_tree.unusable)
    assert main(["train", *common, f"distill.soft_labels={store}", "--out", str(tmp_path / "run")]) == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["corrupt_images"] == len(image_tree.unusable)


def test_engine_batches_carry_the_teachers_outputs_for_another_run_seed(digits_runs, tmp_path):
    """Through the trainer's own loader: a run seeded 1 on a store made with seed 0, in epoch 3
    (crop 3 mod 2 = 1), gets exactly the teacher's logits on the images it trains on."""
    from wsld.models import build_model
    from wsld.run import build_trainer
    from wsld.runtime import setup_runtime
    from wsld.teachers.live import set_teacher_bn_mode
    from wsld.teachers.stored import StoredTeacher

    _, common, store = digits_runs
    cfg = load_config(None, common + ["train.seed=1", "train.epochs=4", f"distill.soft_labels={store}"])
    trainer = build_trainer(cfg, tmp_path / "run", setup_runtime("cpu"))
    trainer.setup()
    assert isinstance(trainer.teacher, StoredTeacher) and trainer.teacher.model is None
    teacher = build_model(cfg.model.teacher, 10, in_channels=1, weights=SoftLabelStore(store).meta["teacher_weights"])
    set_teacher_bn_mode(teacher, "eval")
    trainer.train_sampler.set_epoch(3)
    batch = next(iter(trainer.train_loader))
    x = trainer.normalize(batch.images)
    with torch.no_grad():
        online = teacher(x)
    assert torch.allclose(trainer.teacher.logits(x, batch), online, atol=1e-4)
    assert len(batch.teacher_records["lse"]) == len(batch) and not batch.corrupt


def test_a_batch_of_one_record_converts_to_tensors():
    """A last batch holding a single sample (one image per rank) must not crash the replay collate."""
    from wsld.soft_labels.store import records_from_logits, records_to_tensors

    z, y = torch.randn(1, 10), torch.tensor([3])
    t = records_to_tensors(records_from_logits(z, y, 10, "float32"))
    assert t["log_prob"].shape == (1, 10) and t["lse"].shape == (1,)
    assert torch.allclose(t["lse"], torch.logsumexp(z.double(), 1).float())
