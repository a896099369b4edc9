"""Build teacher and student models by name.

Names resolve, in order: the small CNNs registered here for the built-in data (and MobileNetV1,
the reference's second student, which torchvision lacks), any torchvision classification model,
and any timm model (``timm/<name>`` or a bare name, when timm is installed). Weights are a
torchvision enum name (``IMAGENET1K_V1``) or a local file loaded with ``weights_only=True`` /
safetensors: never plain pickle.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import nn

from wsld.errors import CheckpointError, UserError


def _conv_bn(cin: int, cout: int, stride: int = 1, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride, 1, groups=groups, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)
    )


class CNNTeacher(nn.Module):
    """Five 3x3 conv layers with BN (~35k parameters): about 90% on Fashion-MNIST in 5 epochs, 91.4% in 8."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1, width: int = 16):
        super().__init__()
        w = width
        self.features = nn.Sequential(
            _conv_bn(in_channels, w), _conv_bn(w, w), nn.MaxPool2d(2),
            _conv_bn(w, 2 * w), _conv_bn(2 * w, 2 * w), nn.MaxPool2d(2),
            _conv_bn(2 * w, 4 * w), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )  # fmt: skip
        self.fc = nn.Linear(4 * w, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))


class CNNStudent(nn.Module):
    """Two strided 3x3 convs and a linear head (~1.5k parameters): far below the teacher alone."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1, width: int = 8):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, 2, 1), nn.ReLU(inplace=True),
            nn.Conv2d(width, 2 * width, 3, 2, 1), nn.ReLU(inplace=True),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )  # fmt: skip
        self.fc = nn.Linear(2 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))


class MobileNetV1(nn.Module):
    """MobileNetV1 (Howard et al. 2017), width 1.0: the student of the reference's ResNet-50 pair."""

    CFG = [(64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2)] + [(512, 1)] * 5 + [(1024, 2), (1024, 1)]

    def __init__(self, num_classes: int = 1000, in_channels: int = 3):
        super().__init__()
        layers: list[nn.Module] = [_conv_bn(in_channels, 32, 2)]
        cin = 32
        for cout, stride in self.CFG:
            layers.append(_conv_bn(cin, cin, stride, groups=cin))  # depthwise
            layers.append(nn.Sequential(nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)))
            cin = cout
        self.features = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(1024, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))


LOCAL_MODELS: dict[str, Callable[..., nn.Module]] = {
    "cnn_teacher": CNNTeacher,
    "cnn_student": CNNStudent,
    "mobilenet_v1": MobileNetV1,
}


def _torchvision_names() -> list[str]:
    import torchvision

    return torchvision.models.list_models(module=torchvision.models)


def _timm():
    try:
        import timm  # noqa: F401

        return timm
    except ImportError:
        return None


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return (text.splitlines()[0] if text else type(e).__name__)[:200]


def check_model_name(name: str, key: str) -> str:
    """Which family ``name`` belongs to (``local``, ``torchvision``, ``timm``); UserError if none.

    Cheap (no model is built), so a typo stops a run before a teacher is trained or data is read.
    """
    if name in LOCAL_MODELS:
        return "local"
    if name in _torchvision_names():
        return "torchvision"
    timm = _timm()
    if timm is not None and (name.startswith("timm/") or name in timm.list_models()):
        return "timm"
    hint = "" if timm is not None else " (timm models need: pip install 'wsld[timm]')"
    raise UserError(
        f"config key '{key}': unknown model '{name}': use one of {', '.join(LOCAL_MODELS)}, a torchvision "
        f"classification model name (resnet18, resnet34, ...) or a timm model name{hint}"
    )


def is_weight_file(weights: str) -> bool:
    """A weights value names a file (vs a torchvision enum name such as ``IMAGENET1K_V1``).

    Enum names never hold a dot or a slash, so ``teacher.ckpt`` or ``./w`` is taken as a file
    (and reported as missing if it is not there) rather than as an unknown enum name.
    """
    return "." in weights or "/" in weights or os.sep in weights or Path(weights).exists()


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from a local file: safetensors, or a torch file read with ``weights_only=True``.

    Accepts a bare state dict or a wsld checkpoint (its ``student`` entry, or ``model``).
    """
    p = Path(os.path.expanduser(str(path)))
    if not p.is_file():
        raise CheckpointError(f"weight file not found: {p}")
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(p))
        except Exception as e:
            raise CheckpointError(f"{p} is not a readable safetensors file ({_first_line(e)})") from None
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(
            f"{p} is not a loadable weights file (refused or unreadable with weights_only=True: {_first_line(e)})"
        ) from None
    if isinstance(obj, dict):
        for key in ("student", "model", "state_dict"):
            if key in obj and isinstance(obj[key], dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{p} holds no state dict of tensors (expected weights or a wsld checkpoint)")
    return {k.removeprefix("module.").removeprefix("_orig_mod."): v for k, v in obj.items()}


def classifier_head(model: nn.Module) -> tuple[str, nn.Linear]:
    """The last Linear layer: the classifier for torchvision, timm and our models."""
    found = None
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear):
            found = (name, mod)
    if found is None:
        raise UserError(f"{type(model).__name__} has no Linear classifier head to replace")
    return found


def num_outputs(model: nn.Module) -> int:
    return classifier_head(model)[1].out_features


def replace_head(model: nn.Module, num_classes: int) -> nn.Module:
    """Put a fresh ``num_classes``-way Linear in place of the classifier (same input width)."""
    name, old = classifier_head(model)
    parent = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
    new = nn.Linear(old.in_features, num_classes, bias=old.bias is not None)
    setattr(parent, name.rsplit(".", 1)[-1], new.to(device=old.weight.device, dtype=old.weight.dtype))
    return model


def load_weights(model: nn.Module, state: dict[str, torch.Tensor], source: str, arch: str) -> None:
    """Strict load with one clear line when ``state`` comes from another architecture."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shape_bad = [k for k in own if k in state and tuple(own[k].shape) != tuple(state[k].shape)]
    if missing or unexpected or shape_bad:
        detail = []
        if missing:
            detail.append(f"{len(missing)} missing (e.g. {missing[0]})")
        if unexpected:
            detail.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
        if shape_bad:
            k = shape_bad[0]
            detail.append(f"{len(shape_bad)} of other shape (e.g. {k}: {tuple(state[k].shape)} vs {tuple(own[k].shape)})")
        raise CheckpointError(
            f"{source} does not fit model '{arch}' (is it a checkpoint of another architecture?): {'; '.join(detail)}"
        )
    model.load_state_dict(state)


def _torchvision_model(name: str, num_classes: int, enum_name: Optional[str], key: str) -> nn.Module:
    import torchvision

    if not enum_name:
        return torchvision.models.get_model(name, num_classes=num_classes)
    weights_enum = torchvision.models.get_model_weights(name)
    try:
        w = weights_enum[enum_name]
    except KeyError:
        allowed = [m.name for m in weights_enum] + ["DEFAULT"]
        raise UserError(f"config key '{key}_weights': '{enum_name}' is not a weight of {name} (allowed: {', '.join(allowed)})") from None
    try:
        return torchvision.models.get_model(name, weights=w)
    except Exception as e:  # offline: the download fails
        raise UserError(
            f"config key '{key}_weights': could not load {name} {enum_name} ({_first_line(e)[:160]}); "
            f"without network, download it once into the torch hub cache ($TORCH_HOME) or give a local file"
        ) from None


def build_model(
    name: str,
    num_classes: int,
    *,
    in_channels: int = 3,
    weights: Optional[str] = None,
    replace_head_if_needed: bool = False,
    role: str = "model",
) -> nn.Module:
    """Build ``name`` for ``num_classes`` outputs, optionally with weights (enum name or file).

    A weight file whose classifier has another class count builds a model of that count (so the
    weights load); then, if it still differs from the data's count, the head is replaced only when
    ``replace_head_if_needed`` (students; a teacher with a random head would teach nothing).
    """
    key = f"model.{role}"
    family = check_model_name(name, key)
    weight_file = weights if weights and is_weight_file(weights) else None
    enum_name = weights if weights and not weight_file else None
    state = load_state_dict_file(weight_file) if weight_file else None
    if family == "local":
        if enum_name:
            raise UserError(f"config key '{key}_weights': '{name}' has no pretrained weights by name ('{enum_name}'); give a weight file")
        model = LOCAL_MODELS[name](num_classes=num_classes, in_channels=in_channels)
    elif family == "torchvision":
        if in_channels != 3:
            raise UserError(f"config key '{key}': torchvision model '{name}' expects 3-channel images, the data has {in_channels}")
        model = _torchvision_model(name, num_classes, enum_name, key)
    else:
        timm = _timm()
        tname = name.removeprefix("timm/")
        try:
            if enum_name:  # timm picks weights by the tag in the model name (resnet50.a1_in1k)
                model = timm.create_model(tname, pretrained=True, in_chans=in_channels)
            else:
                model = timm.create_model(tname, pretrained=False, num_classes=num_classes, in_chans=in_channels)
        except Exception as e:
            raise UserError(f"config key '{key}': could not build timm model '{tname}' ({_first_line(e)[:160]})") from None
    if state is not None:
        head_name, head = classifier_head(model)
        file_head = state.get(f"{head_name}.weight")
        if file_head is not None and file_head.ndim == 2 and file_head.shape[0] != head.out_features:
            replace_head(model, int(file_head.shape[0]))
        load_weights(model, state, str(weight_file), name)
    out = num_outputs(model)
    if out != num_classes:
        source = f" (from {weights})" if weights else ""
        if role == "teacher":
            raise UserError(
                f"model.teacher '{name}'{source} has {out} outputs but the data has {num_classes} classes: a teacher "
                f"must be trained on the same classes (give a teacher for this data, or model.teacher_weights=null "
                f"to train one first)"
            )
        if not replace_head_if_needed:
            raise UserError(
                f"model.{role} '{name}'{source} has {out} outputs but the data has {num_classes} classes: "
                f"set model.replace_head=true to put a new {num_classes}-way head on it"
            )
        replace_head(model, num_classes)
    return model
