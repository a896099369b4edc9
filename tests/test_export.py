"""``wsld export``: round trips for safetensors, TorchScript and ONNX on a tiny trained digits student."""

from __future__ import annotations

import importlib.util
import json
import re

import numpy as np
import pytest
import torch

from wsld.checkpoint import load_checkpoint
from wsld.cli import main
from wsld.config import load_config
from wsld.data.build import build_datasets
from wsld.export import load_student


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A digits student trained for one epoch with CE (no teacher needed)."""
    tmp = tmp_path_factory.mktemp("export")
    args = ["train", "data.dataset=digits", "distill.loss=ce", "model.student=cnn_student", "train.epochs=1", "data.batch_size=64",
            "data.workers=0", "train.progress=false", f"model.teacher_cache={tmp / 'cache'}", "--out", str(tmp / "run")]  # fmt: skip
    assert main(args) == 0
    return tmp / "run"


def _val_batch(run_dir):
    cfg = load_config(run_dir / "config.yaml")
    _, val, info = build_datasets(cfg.data)
    x = torch.stack([val[i][0] for i in range(32)]).float()
    mean = torch.tensor(info.mean).view(1, -1, 1, 1) * 255
    std = torch.tensor(info.std).view(1, -1, 1, 1) * 255
    return (x - mean) / std


def _reported_diff(out: str) -> float:
    m = re.search(r"max \|logit difference\| vs PyTorch = (\S+)", out)
    assert m, out
    return float(m.group(1))


def _no_temp_files(folder):
    assert not [p.name for p in folder.iterdir() if p.name.endswith(".tmp")]


def test_safetensors_round_trip_and_eval(run_dir, tmp_path, capsys):
    from safetensors import safe_open
    from safetensors.torch import load_file

    out = tmp_path / "student.safetensors"
    assert main(["export", str(run_dir / "last.pt"), "--format", "safetensors", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert _reported_diff(printed) == 0.0
    assert f"--config {run_dir / 'config.yaml'}" in printed
    state = load_checkpoint(run_dir / "last.pt")["student"]
    back = load_file(str(out))
    assert back.keys() == state.keys() and all(torch.equal(back[k], state[k]) for k in state)
    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
    assert json.loads(meta["arch"]) == "cnn_student" and len(json.loads(meta["classes"])) == 10
    pre = json.loads(meta["preprocessing"])
    assert (pre["center_crop"], pre["resize_shorter_side"], pre["mean"]) == (8, None, json.loads(meta["mean"]))
    # weights only: wsld eval needs the run's config and gives the checkpoint's numbers
    assert main(["eval", str(out), "--config", str(run_dir / "config.yaml"), "train.progress=false"]) == 0
    from_export = capsys.readouterr().out
    assert main(["eval", str(run_dir / "last.pt"), "train.progress=false"]) == 0
    from_ckpt = capsys.readouterr().out
    top1 = re.compile(r"top-1 (\S+)\s+top-5 (\S+)")
    assert top1.search(from_export).groups() == top1.search(from_ckpt).groups()
    assert main(["eval", str(out)]) == 2
    assert "--config" in capsys.readouterr().err
    _no_temp_files(tmp_path)


@pytest.mark.filterwarnings("ignore::FutureWarning")  # torch.jit.load is deprecated upstream
def test_torchscript_round_trip(run_dir, capsys):
    assert main(["export", str(run_dir / "best.pt"), "--format", "torchscript"]) == 0
    out = run_dir / "best.torchscript.pt"
    assert _reported_diff(capsys.readouterr().out) <= 1e-5
    extra = {"wsld.json": ""}
    scripted = torch.jit.load(str(out), _extra_files=extra)
    meta = json.loads(extra["wsld.json"])
    assert meta["num_classes"] == 10 and meta["in_channels"] == 1 and meta["image_size"] == 8
    model, _, _, _ = load_student(run_dir / "best.pt")
    x = _val_batch(run_dir)
    with torch.no_grad():
        assert torch.allclose(scripted(x), model(x), atol=1e-5)
    _no_temp_files(run_dir)


@pytest.mark.skipif(importlib.util.find_spec("onnxruntime") is None, reason="onnxruntime not installed (wsld[onnx])")
def test_onnx_round_trip_in_onnxruntime(run_dir, tmp_path, capsys):
    import onnx
    import onnxruntime as ort

    out = tmp_path / "student.onnx"
    assert main(["export", str(run_dir / "last.pt"), "--format", "onnx", "--out", str(out)]) == 0
    assert _reported_diff(capsys.readouterr().out) <= 1e-4
    meta = {p.key: json.loads(p.value) for p in onnx.load(str(out)).metadata_props}
    assert meta["mean"] and meta["classes"] == [str(i) for i in range(10)]
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    model, _, _, _ = load_student(run_dir / "last.pt")
    x = _val_batch(run_dir)[:7]  # another batch size than the export's example: the batch axis is dynamic
    got = session.run(["logits"], {"images": x.numpy()})[0]
    with torch.no_grad():
        np.testing.assert_allclose(got, model(x).numpy(), atol=1e-4)
    assert list(tmp_path.iterdir()) == [out]  # one self-contained file, no temp or external-data files


def test_export_errors(run_dir, tmp_path, capsys):
    assert main(["export", str(tmp_path / "missing.pt"), "--format", "onnx"]) == 2
    assert "checkpoint not found" in capsys.readouterr().err
    assert main(["export", str(run_dir / "last.pt"), "--format", "safetensors", "--out", str(run_dir / "last.pt")]) == 2
    assert "checkpoint itself" in capsys.readouterr().err
    assert main(["export", str(run_dir / "last.pt"), "--format", "safetensors", "--out", str(tmp_path / "no" / "x.st")]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    assert main(["export", str(tmp_path / "junk.pt"), "--format", "torchscript"]) == 2
    assert "not a loadable wsld checkpoint" in capsys.readouterr().err
    assert main(["export", str(run_dir / "last.pt"), "--format", "torchscript", "--ema"]) == 2
    assert "no EMA weights" in capsys.readouterr().err


def test_photo_preprocessing_names_resize_crop_and_interpolation():
    from wsld.config import load_config
    from wsld.export import preprocessing

    cfg = load_config(None, ["data.format=folder", "data.data_path=/data", "data.image_size=224", "data.val_resize=256"])
    pre = preprocessing(cfg, 3, {"image_size": 224, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]})
    assert (pre["resize_shorter_side"], pre["center_crop"], pre["decode"]) == (256, 224, "RGB, uint8")
    assert pre["interpolation"].startswith("bilinear, antialiased") and pre["scale"] == "1/255"
