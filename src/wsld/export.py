"""``wsld export CHECKPOINT --format onnx|torchscript|safetensors [--out PATH]``: the student for deployment.

Every format holds the student alone, in eval mode, taking float images normalised with the
training mean/std (N, C, H, W) and returning logits (N, classes); the mean, std, class names and
input size travel as metadata (ONNX ``metadata_props``, a ``wsld.json`` extra file in TorchScript,
the safetensors header). The file is built in memory, loaded back from there and run on a batch
of validation images (Gaussian noise when the data is not on this machine), and its logits are
compared with the PyTorch model's; the max absolute difference is printed, and an export that
disagrees is not written. ONNX is exported with ``torch.onnx.export(dynamo=True)`` (a dynamic
batch axis) and checked with onnxruntime: ``pip install 'wsld[onnx]'``. safetensors holds weights
only: ``wsld eval model.safetensors --config RUN/config.yaml`` evaluates it.
"""

from __future__ import annotations

import contextlib
import io
import json
import shutil
import warnings
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import Tensor, nn

from wsld.errors import CheckpointError, UserError
from wsld.files import atomic_write_bytes

FORMATS = ("onnx", "torchscript", "safetensors")
SUFFIX = {"onnx": ".onnx", "torchscript": ".torchscript.pt", "safetensors": ".safetensors"}
CHECK_BATCH = 16
# max |logit difference| accepted, relative to the largest |logit| (float32 kernels differ in order)
TOLERANCE = 1e-4


def _pip_hint() -> str:
    return "pip install 'wsld[onnx]' (onnx, onnxscript, onnxruntime)"


def load_student(checkpoint: Path, ema: bool = False, allow_import: bool = False) -> tuple[nn.Module, dict[str, Tensor], Any, dict]:
    """``(model in eval mode, state dict, config, checkpoint)`` of a wsld checkpoint's student; a
    student of the user's own code (``package.module:callable``) is imported only with ``allow_import``."""
    from wsld.checkpoint import load_checkpoint, refuse_unnamed_import, student_state
    from wsld.config import config_from_dict
    from wsld.models import build_model

    if checkpoint.suffix == ".safetensors":
        raise UserError(f"{checkpoint} holds weights only: export from the run's checkpoint (last.pt, best.pt or epoch_<n>.pt)")
    ck = load_checkpoint(checkpoint)
    state = student_state(ck, checkpoint, ema=ema)
    cfg = config_from_dict(ck.get("config", {}))
    arch = ck.get("student_arch", cfg.model.student)
    refuse_unnamed_import(str(arch), checkpoint, False, allow_import)
    num_classes = int(ck.get("num_classes") or 0)
    in_channels = _in_channels(state)
    try:
        model = build_model(arch, num_classes, in_channels=in_channels, replace_head_if_needed=True, role="student")
        model.load_state_dict(state)
    except RuntimeError as e:
        raise CheckpointError(f"{checkpoint} does not fit student '{arch}': {str(e).splitlines()[0]}") from None
    return model.eval(), state, cfg, ck


def _in_channels(state: dict[str, Tensor]) -> int:
    for v in state.values():
        if v.ndim == 4:
            return int(v.shape[1])
    return 3


def sample_batch(cfg, in_channels: int, log: Callable[[str], None]) -> tuple[Tensor, dict[str, Any]]:
    """Normalised validation images to check the export on (noise if the data is not here)."""
    from wsld.data.build import build_datasets

    try:
        _, val, info = build_datasets(cfg.data, seed=cfg.train.seed)
    except UserError as e:
        if cfg.data.format == "builtin":
            raise
        size = cfg.data.image_size
        log(f"validation data not readable here ({e}): checking the export on Gaussian noise instead")
        g = torch.Generator().manual_seed(0)
        x = torch.randn(CHECK_BATCH, in_channels, size, size, generator=g)
        from wsld.data import IMAGENET_MEAN, IMAGENET_STD  # what photo datasets normalise with by default

        mean = list(cfg.data.mean) if cfg.data.mean is not None else IMAGENET_MEAN
        std = list(cfg.data.std) if cfg.data.std is not None else IMAGENET_STD
        return x, {"check_input": "gaussian noise", "image_size": size, "mean": mean, "std": std}
    images = []
    for i in range(len(val)):
        item = val[i]
        if isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], Tensor):
            images.append(item[0])
        if len(images) == CHECK_BATCH:
            break
    if not images:
        raise UserError("no readable validation image to check the export on")
    u8 = torch.stack(images).float()
    mean = torch.tensor(info.mean).view(1, -1, 1, 1) * 255.0
    std = torch.tensor(info.std).view(1, -1, 1, 1) * 255.0
    x = (u8 - mean) / std
    return x, {"check_input": f"{len(images)} {cfg.data.dataset} {cfg.data.val_split} images",
               "image_size": int(x.shape[-1]), "mean": info.mean, "std": info.std}  # fmt: skip


def preprocessing(cfg, in_channels: int, data_meta: dict[str, Any]) -> dict[str, Any]:
    """Everything a deployment must do to an image before the model, as evaluation did it."""
    photos = cfg.data.format != "builtin"
    return {
        "decode": ("RGB" if in_channels == 3 else "grayscale") + ", uint8",
        # photos: Resize(val_resize) on the shorter side, then CenterCrop(image_size); built-ins come at their size
        "resize_shorter_side": int(cfg.data.val_resize) if photos else None,
        "center_crop": int(data_meta["image_size"]),
        "interpolation": "bilinear, antialiased (torch.nn.functional.interpolate antialias=True)" if photos else None,
        "scale": "1/255", "mean": data_meta["mean"], "std": data_meta["std"], "layout": "NCHW float32",
    }


def write_out(data: bytes, out: Path) -> None:
    """``data`` to ``out`` through a temp file beside it (fsync, rename); a full disk is one line and
    leaves no temp file. The export is built in memory first, so the exporters never meet the disk."""
    try:
        free = shutil.disk_usage(out.parent).free
    except OSError:
        free = None
    if free is not None and free < len(data):
        raise UserError(f"cannot write {out}: the export needs {len(data) / 2**20:.1f} MiB and {out.parent} has "
                        f"{free / 2**20:.1f} MiB free: make room or give another --out")
    try:
        atomic_write_bytes(out, data)
    except OSError as e:
        raise UserError(f"cannot write {out}: {e.strerror or e} (nothing was written): make room or give another --out") from None


def _max_diff(a: np.ndarray | Tensor, b: Tensor) -> float:
    a = torch.as_tensor(np.asarray(a)).float()
    if a.shape != b.shape:
        raise UserError(f"the exported model returns shape {tuple(a.shape)}, PyTorch {tuple(b.shape)}")
    return float((a - b).abs().max())


def _write_safetensors(model: nn.Module, state: dict[str, Tensor], meta: dict, x: Tensor, ref: Tensor) -> tuple[bytes, float]:
    from safetensors.torch import load, save

    data = save({k: v.detach().cpu().contiguous() for k, v in state.items()},
                metadata={k: json.dumps(v) for k, v in meta.items()})  # fmt: skip
    fresh = _fresh_copy(model)
    fresh.load_state_dict(load(data))
    with torch.no_grad():
        return data, _max_diff(fresh.eval()(x), ref)


def _fresh_copy(model: nn.Module) -> nn.Module:
    import copy

    fresh = copy.deepcopy(model)
    with torch.no_grad():
        for t in list(fresh.parameters()) + list(fresh.buffers()):
            if t.is_floating_point():
                t.zero_()
    return fresh


def _write_torchscript(model: nn.Module, meta: dict, x: Tensor, ref: Tensor) -> tuple[bytes, float]:
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated upstream but still loads everywhere
        traced = torch.jit.trace(model, x[:2], check_trace=False)
        torch.jit.save(traced, buf, _extra_files={"wsld.json": json.dumps(meta)})
        back = torch.jit.load(io.BytesIO(buf.getvalue()), map_location="cpu")
    with torch.no_grad():
        return buf.getvalue(), _max_diff(back(x), ref)


def _write_onnx(model: nn.Module, meta: dict, x: Tensor, ref: Tensor) -> tuple[bytes, float]:
    try:
        import onnx
        import onnxruntime as ort
        import onnxscript  # noqa: F401  - torch.onnx's exporter needs it
    except ImportError as e:
        raise UserError(f"--format onnx needs the optional packages: {_pip_hint()} ({e.name} is missing)") from None
    quiet = io.StringIO()
    try:
        with contextlib.redirect_stdout(quiet), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                model, (x[:2],), None, input_names=["images"], output_names=["logits"],
                dynamic_shapes=({0: torch.export.Dim("batch")},), dynamo=True, verbose=False,
            )  # fmt: skip
            proto = program.model_proto
    except Exception as e:  # noqa: BLE001 - exporter failures come in many types
        raise UserError(f"ONNX export of this model failed: {str(e).strip().splitlines()[0][:300]}") from None
    for k, v in meta.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = k, json.dumps(v)
    data = proto.SerializeToString()
    onnx.checker.check_model(onnx.load_from_string(data))
    session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    out = session.run(["logits"], {"images": x.numpy()})[0]
    return data, _max_diff(out, ref)


def export_student(
    checkpoint: str | Path, fmt: str, out: str | Path | None = None, ema: bool = False,
    log: Callable[[str], None] = lambda m: None, allow_import: bool = False,
) -> dict[str, Any]:
    """Write the student of ``checkpoint`` as ``fmt``; returns what was written and the check's result."""
    if fmt not in FORMATS:
        raise UserError(f"--format must be one of {', '.join(FORMATS)}, got {fmt}")
    checkpoint = Path(checkpoint)
    if not checkpoint.is_file() and not checkpoint.is_dir():  # a folder gets load_checkpoint's hint
        raise CheckpointError(f"checkpoint not found: {checkpoint}")
    model, state, cfg, ck = load_student(checkpoint, ema, allow_import)
    out_path = Path(out) if out else checkpoint.with_name(checkpoint.stem + SUFFIX[fmt])
    if out_path.resolve() == checkpoint.resolve():
        raise UserError(f"--out {out_path} is the checkpoint itself: choose another file name")
    if out_path.is_dir():
        raise UserError(f"--out {out_path} is a folder: give a file name")
    if not out_path.parent.is_dir():
        raise UserError(f"--out {out_path}: folder {out_path.parent} does not exist")
    x, data_meta = sample_batch(cfg, _in_channels(state), log)
    with torch.no_grad():
        ref = model(x).float()
    meta = {
        "format": "wsld-student-1", "arch": ck.get("student_arch", cfg.model.student), "num_classes": int(ref.shape[1]),
        "classes": list(ck.get("classes") or []), "in_channels": int(x.shape[1]), "image_size": data_meta["image_size"],
        "mean": data_meta["mean"], "std": data_meta["std"], "input": "float NCHW, (pixel/255 - mean) / std",
        "preprocessing": preprocessing(cfg, int(x.shape[1]), data_meta),
        "weights": "ema" if ema else "student", "source": str(checkpoint), "epoch": ck.get("epoch"),
    }  # fmt: skip
    if fmt == "safetensors":
        data, diff = _write_safetensors(model, state, meta, x, ref)
    elif fmt == "torchscript":
        data, diff = _write_torchscript(model, meta, x, ref)
    else:
        data, diff = _write_onnx(model, meta, x, ref)
    limit = TOLERANCE * max(1.0, float(ref.abs().max()))
    if not diff <= limit:
        raise UserError(f"the {fmt} export's logits differ from PyTorch's by {diff:.3g} (> {limit:.3g}): not written")
    write_out(data, out_path)
    return {
        "path": str(out_path), "format": fmt, "bytes": out_path.stat().st_size, "max_abs_diff": diff,
        "check_input": data_meta["check_input"], "arch": meta["arch"], "num_classes": meta["num_classes"],
        "input_shape": list(x.shape[1:]),
    }  # fmt: skip
