"""Build teacher and student models by name: built-in CNNs, the CIFAR benchmark's nets (``cifar_models``), torchvision, timm, or the user's own code."""

from __future__ import annotations

import importlib
import inspect
import os
import sys
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import nn

from wsld.cifar_models import CIFAR_MODEL_NAMES, cifar_model, crd_name_hint
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


def _accepts(fn: Callable[..., nn.Module], param: str) -> Optional[bool]:
    """Whether ``fn`` takes keyword ``param`` (or ``**kwargs``); None where no signature can be read."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return None
    return any((p.name == param and p.kind != p.POSITIONAL_ONLY) or p.kind == p.VAR_KEYWORD for p in params)


def user_model_callable(name: str, key: str) -> Callable[..., nn.Module]:
    """The callable behind ``package.module:callable``, imported but not called (cheap: no model is built).

    The current directory is appended to ``sys.path`` (a console script has only its own directory
    there), so a ``mymodels.py`` where wsld runs is found; appended, not prepended, so a file there
    cannot shadow a library imported later (an installed module of the same name wins; the error
    for a missing callable names the file that was imported).
    """
    module_name, _, attr = name.partition(":")
    if not module_name or not attr:
        raise UserError(f"config key '{key}': '{name}' is not of the form package.module:callable (e.g. mymodels:tiny_net)")
    cwd = os.getcwd()
    if cwd not in sys.path:
        sys.path.append(cwd)
    where = f"in the current directory ({cwd}) or on PYTHONPATH"
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name and (module_name == e.name or module_name.startswith(e.name + ".")):
            raise UserError(f"config key '{key}': no module '{module_name}' for '{name}': put it {where}") from None
        raise UserError(f"config key '{key}': importing '{module_name}' failed: {_first_line(e)} (install it)") from None
    except Exception as e:  # the user's module itself fails: a syntax error, an exception at import
        raise UserError(f"config key '{key}': importing '{module_name}' failed ({type(e).__name__}: {_first_line(e)})") from None
    fn = module
    for part in attr.split("."):
        if not hasattr(fn, part):
            raise UserError(f"config key '{key}': module '{module_name}' ({getattr(module, '__file__', '?')}) has no '{attr}'")
        fn = getattr(fn, part)
    if not callable(fn):
        raise UserError(
            f"config key '{key}': '{name}' is not callable (it is {type(fn).__name__}); name a function or class returning an nn.Module"
        )
    if _accepts(fn, "num_classes") is False:
        raise UserError(
            f"config key '{key}': '{name}' takes no num_classes argument; define it as {attr}(num_classes) returning an nn.Module"
        )
    return fn


def _user_model(name: str, num_classes: int, in_channels: int, key: str) -> nn.Module:
    """Call the user's callable with ``num_classes=`` (and ``in_channels=`` where it takes that keyword)."""
    fn = user_model_callable(name, key)
    kwargs = {"num_classes": num_classes}
    if _accepts(fn, "in_channels"):
        kwargs["in_channels"] = in_channels
    call = f"{name.partition(':')[2]}({', '.join(f'{k}={v}' for k, v in kwargs.items())})"
    try:
        model = fn(**kwargs)
    except Exception as e:
        raise UserError(f"config key '{key}': {call} from '{name}' raised {type(e).__name__}: {_first_line(e)}") from None
    if not isinstance(model, nn.Module):
        raise UserError(f"config key '{key}': {call} from '{name}' returned {type(model).__name__}, not a torch.nn.Module")
    return model


def check_model_name(name: str, key: str) -> str:
    """Which family ``name`` belongs to; UserError if none.

    In order: ``user`` (``package.module:callable``), ``local`` (the small CNNs for the built-in
    data, the CIFAR benchmark's ResNets, WRNs and VGGs, MobileNetV1 which torchvision lacks), ``torchvision`` (any
    classification model), ``timm`` (``timm/<name>`` or a bare timm name, when timm is installed).
    Cheap (no model is built), so a typo stops a run before a teacher is trained or data is read.
    """
    if ":" in name and not name.startswith("timm/"):
        user_model_callable(name, key)
        return "user"
    if name in LOCAL_MODELS or cifar_model(name, key) is not None:
        return "local"
    if name in _torchvision_names():
        return "torchvision"
    timm = _timm()
    if timm is not None and (name.startswith("timm/") or name in timm.list_models()):
        return "timm"
    ours = crd_name_hint(name)  # CRD's resnet20, resnet8x4, wrn_40_2, vgg8, ...
    if ours is not None:
        hint = f"; did you mean {ours}, the CIFAR benchmark's net?"
    else:
        hint = "" if timm is not None else " (timm models need: pip install 'wsld[timm]')"
    raise UserError(
        f"config key '{key}': unknown model '{name}': use one of {', '.join(LOCAL_MODELS)}, {CIFAR_MODEL_NAMES}, "
        f"a torchvision classification model name (resnet18, resnet34, ...), a timm model name or your own "
        f"package.module:callable{hint}"
    )


def is_weight_file(weights: str) -> bool:
    """A weights value names a file (vs a torchvision enum name such as ``IMAGENET1K_V1``).

    Enum names never hold a dot or a slash, so ``teacher.ckpt`` or ``./w`` is taken as a file
    (and reported as missing if it is not there) rather than as an unknown enum name.
    """
    return "." in weights or "/" in weights or os.sep in weights or Path(weights).exists()


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from a local file: safetensors, a bare torch state dict, or a wsld checkpoint
    (its ``student``), read by ``wsld.checkpoint.read_weights`` (weights_only, CRCs and format checked)."""
    from wsld.checkpoint import read_weights

    return read_weights(path)


def _last_linear(model: nn.Module) -> Optional[tuple[str, nn.Linear]]:
    found = None
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear):
            found = (name, mod)
    return found


def classifier_head(model: nn.Module) -> tuple[str, nn.Linear]:
    """The last Linear layer: the classifier for torchvision, timm and our models."""
    found = _last_linear(model)
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


class TeacherNeedsTraining(UserError):
    """A teacher whose pretrained head has other classes than the data: it must be fine-tuned first
    (``wsld train --teacher-only``); ``wsld train`` adds the exact commands to this message."""

    def __init__(self, message: str, weights: str):
        super().__init__(message)
        self.weights = weights


# what a user writes for "the pretrained weights" in either family: torchvision's DEFAULT enum, timm's pretrained tag
PRETRAINED = "pretrained"


def _torchvision_weights(name: str, enum_name: str, key: str):
    """torchvision's weight enum member ``enum_name`` of model ``name`` (``pretrained``: ``DEFAULT``), without loading it."""
    import torchvision

    try:
        weights_enum = torchvision.models.get_model_weights(name)
    except (ValueError, KeyError):
        raise UserError(f"config key '{key}_weights': torchvision has no pretrained weights for '{name}'; give a weight file") from None
    try:
        return weights_enum["DEFAULT" if enum_name == PRETRAINED else enum_name]
    except KeyError:
        allowed = [m.name for m in weights_enum] + ["DEFAULT", PRETRAINED]
        raise UserError(f"config key '{key}_weights': '{enum_name}' is not a weight of {name} (allowed: {', '.join(allowed)})") from None


def _timm_pretrained_classes(tname: str) -> Optional[int]:
    """The class count of timm model ``tname``'s pretrained weights, read from its config (no download)."""
    try:
        from timm.models import get_pretrained_cfg

        cfg = get_pretrained_cfg(tname)
    except Exception:  # an unknown tag or an older timm: timm itself says so when it builds the model
        return None
    n = getattr(cfg, "num_classes", None) if cfg is not None else None
    return int(n) if n else None


def pretrained_classes(name: str, weights: str, key: str) -> Optional[int]:
    """How many classes the named (not file) pretrained weights ``weights`` of model ``name`` predict, read
    from the weights' metadata without downloading them; None when unknown."""
    family = check_model_name(name, key)
    if family == "torchvision":
        categories = _torchvision_weights(name, weights, key).meta.get("categories")
        return len(categories) if categories else None
    if family == "timm":
        return _timm_pretrained_classes(name.removeprefix("timm/"))
    return None


def _cached_file_hint(w) -> str:
    import torch.hub

    return os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(w.url))


def _torchvision_model(name: str, num_classes: int, enum_name: Optional[str], key: str) -> nn.Module:
    import torchvision

    if not enum_name:
        return torchvision.models.get_model(name, num_classes=num_classes)
    w = _torchvision_weights(name, enum_name, key)
    try:
        return torchvision.models.get_model(name, weights=w)
    except Exception as e:  # offline: the download fails
        raise UserError(
            f"config key '{key}_weights': could not load {name} {w.name} ({_first_line(e)[:160]}); without network, put "
            f"the file at {_cached_file_hint(w)} (torchvision's cache; TORCH_HOME moves it) or give {key}_weights=FILE"
        ) from None


def _new_head(model: nn.Module, num_classes: int, family: str) -> None:
    if family == "timm" and hasattr(model, "reset_classifier"):
        model.reset_classifier(num_classes)  # timm's own: the right layer whatever the architecture
    else:
        replace_head(model, num_classes)


def _teacher_mismatch(name: str, weights: str, out: int, num_classes: int) -> TeacherNeedsTraining:
    return TeacherNeedsTraining(
        f"model.teacher {name} with model.teacher_weights={weights} has {out} outputs but the data has {num_classes} classes: "
        "a teacher must be fine-tuned on your classes before it can teach them", weights
    )


def build_model(
    name: str,
    num_classes: int,
    *,
    in_channels: int = 3,
    weights: Optional[str] = None,
    replace_head_if_needed: Optional[bool] = False,
    role: str = "model",
    log: Optional[Callable[[str], None]] = None,
    key: Optional[str] = None,
) -> nn.Module:
    """Build ``name`` for ``num_classes`` outputs, optionally with weights: a torchvision enum name
    (``IMAGENET1K_V1``, ``DEFAULT``), ``pretrained`` (torchvision's DEFAULT, timm's pretrained tag) or a file.

    A weight file whose classifier has another class count builds a model of that count (so the
    weights load). If the count still differs from the data's, a student gets a new head when
    ``replace_head_if_needed`` is True or None (None: ``model.replace_head`` left unset; either way
    ``log`` gets one line saying so) and is refused when False; a teacher is refused with
    ``TeacherNeedsTraining`` (a random head would teach nothing), for named weights before any download.
    ``key`` names the config key in messages (default ``model.<role>``; a teacher run's model is ``model.teacher``).
    """
    key = key or f"model.{role}"
    family = check_model_name(name, key)
    weight_file = weights if weights and is_weight_file(weights) else None
    enum_name = weights if weights and not weight_file else None
    if family in ("local", "user") and enum_name:
        raise UserError(f"config key '{key}_weights': '{name}' has no pretrained weights by name ('{enum_name}'); give a weight file")
    if role == "teacher" and enum_name:  # refused before a download that could not help
        known = pretrained_classes(name, enum_name, key)
        if known is not None and known != num_classes:
            raise _teacher_mismatch(name, enum_name, known, num_classes)
    state = load_state_dict_file(weight_file) if weight_file else None
    if family == "user":
        model = _user_model(name, num_classes, in_channels, key)
    elif family == "local":
        cifar = cifar_model(name, key)
        if cifar is not None:
            model = cifar[0](num_classes=num_classes, in_channels=in_channels, **cifar[1])
        else:
            model = LOCAL_MODELS[name](num_classes=num_classes, in_channels=in_channels)
    elif family == "torchvision":
        if in_channels != 3:
            raise UserError(f"config key '{key}': torchvision model '{name}' expects 3-channel images, the data has {in_channels}")
        model = _torchvision_model(name, num_classes, enum_name, key)
    else:
        timm = _timm()
        tname = name.removeprefix("timm/")
        if enum_name and enum_name not in (PRETRAINED, "DEFAULT"):
            raise UserError(f"config key '{key}_weights': timm models take '{PRETRAINED}' (the weights of the tag in the model "
                            f"name, e.g. timm/resnet18.a1_in1k) or a weight file, not '{enum_name}'")
        try:
            if enum_name:  # timm picks weights by the tag in the model name (resnet50.a1_in1k)
                model = timm.create_model(tname, pretrained=True, in_chans=in_channels)
            else:
                model = timm.create_model(tname, pretrained=False, num_classes=num_classes, in_chans=in_channels)
        except Exception as e:
            offline = (f"; without network, put its weights in the Hugging Face cache ($HF_HOME) or give {key}_weights=FILE"
                       if enum_name else "")
            raise UserError(f"config key '{key}': could not build timm model '{tname}' ({_first_line(e)[:160]}){offline}") from None
    if family == "user" and _last_linear(model) is None:  # e.g. a 1x1-conv head: trust its num_classes
        if state is not None:
            load_weights(model, state, str(weight_file), name)
        return model
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
            if weights:
                raise _teacher_mismatch(name, weights, out, num_classes)
            raise UserError(f"model.teacher '{name}' has {out} outputs but the data has {num_classes} classes")
        if replace_head_if_needed is False:
            raise UserError(
                f"{key} '{name}'{source} has {out} outputs but the data has {num_classes} classes: "
                f"set model.replace_head=true (or leave it null) to put a new {num_classes}-way head on it"
            )
        _new_head(model, num_classes, family)
        if log is not None:
            log(f"{name}{source} predicts {out} classes, the data has {num_classes}: its classifier is replaced by a new "
                f"{num_classes}-way head, trained from scratch with the rest fine-tuned (model.replace_head=false refuses instead)")
    return model


def architecture_fingerprint(name: str, key: str = "model.teacher") -> list[list]:
    """Parameter and buffer names and shapes of model ``name``, so a cached teacher is not reused
    after its architecture changed.

    Built on the meta device (no memory, no init cost); a user's model that cannot be built there
    (its code reads tensor values, say) is built on the CPU instead.
    """
    family = check_model_name(name, key)
    in_channels, role = (1 if family == "local" else 3), key.rpartition(".")[2]
    try:
        with torch.device("meta"):
            model = build_model(name, 1, in_channels=in_channels, role=role)
    except UserError:
        if family != "user":
            raise
        model = build_model(name, 1, in_channels=in_channels, role=role)
    return [[k, list(v.shape)] for k, v in model.state_dict().items()]
