"""The typed configuration schema.

One dataclass tree, read through OmegaConf: a YAML file is merged onto the defaults, then dotted
``key=value`` overrides from the command line. OmegaConf rejects unknown keys and wrong types;
``validate`` then checks ranges and names against the registries, so every mistake stops the run
before anything is built, with one line naming the key.

The defaults are the built-in default run: WSLD on Fashion-MNIST, CIFAR ResNet cifar_resnet20_s2
teacher -> cifar_resnet8_s2 student (``configs/fashion_mnist_wsld.yaml`` spells the same values out).
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from wsld.errors import UserError


@dataclass
class DataConfig:
    dataset: str = "fashion-mnist"  # built-in: fashion-mnist | digits | cifar10 | cifar100; photos: any name (imagenet, mine, ...)
    data_path: Optional[str] = None  # built-ins: folder with the raw files; others: dataset root
    format: str = "builtin"  # builtin | folder | list | lmdb
    train_split: str = "train"
    val_split: str = "val"
    batch_size: int = 128  # global batch, summed over all processes
    # or give the batch per process (timm's --batch-size): data.batch_size becomes this x the number
    # of processes (torchrun's WORLD_SIZE) when the config is read, and the run records that
    batch_size_per_device: Optional[int] = None
    val_batch_size: Optional[int] = None  # default: batch_size
    workers: int = 1  # DataLoader workers per process
    image_size: int = 224  # train crop / val crop for photo datasets
    val_resize: int = 256  # val: Resize(val_resize) + CenterCrop(image_size)
    min_scale: float = 0.08  # RandomResizedCrop scale lower bound
    # photos: resized = RandomResizedCrop (ImageNet); padded = Resize + CenterCrop to image_size, then a
    # random crop of the zero-padded image (small images: CIFAR, Fashion-MNIST; see docs/demo.md)
    train_crop: str = "resized"
    crop_padding: int = 4  # padded: zero pixels added on each side before the random crop
    hflip: bool = True
    augment: bool = True  # built-in data: random crop of the padded image (pad: Fashion-MNIST 2, digits 1, CIFAR 4) + flip (not digits); photos: RandomResizedCrop
    color_jitter: float = 0.0  # reference tool's optional ColorJitter(0.4, 0.4, 0.4) -> 0.4
    fast_decode: bool = True  # JPEG DCT-domain downscaling before the crop is resized
    # photos: where JPEGs are decoded and cropped: cpu (loader workers) | gpu (the training device, nvJPEG;
    # workers only read bytes and draw the crop boxes) | auto (gpu on CUDA when the data holds JPEGs)
    decode: str = "cpu"
    mean: Optional[list[float]] = None  # None: the dataset's own statistics
    std: Optional[list[float]] = None
    long_tail_ratio: float = 1.0  # > 1: exponentially imbalanced train split, n_max / n_min
    # > 0: this share of each class's training images (a fixed draw) is held out and becomes the val
    # split, with val transforms; the run trains on the rest and never reads data.val_split (wsld compare's searches)
    holdout: float = 0.0
    on_corrupt: str = "skip"  # skip | stop: what a corrupt image met in training does
    # reference-tool LMDBs: folders = label by sorted class folders of the datalist (torchvision teachers'
    # order); stored = the labels stored in the values (for a teacher trained on them)
    reference_labels: str = "folders"


@dataclass
class ModelConfig:
    teacher: str = "cifar_resnet20_s2"  # the built-in run: the demo's BatchNorm pair (docs/demo.md)
    # torchvision weight enum name (IMAGENET1K_V1, DEFAULT), pretrained (torchvision's DEFAULT, timm's tag),
    # a local .pt/.pth/.safetensors file, or null: train the teacher first (cached under teacher_cache,
    # reused next time). With --teacher-only: the weights the teacher's training starts from
    teacher_weights: Optional[str] = None
    student: str = "cifar_resnet8_s2"
    student_weights: Optional[str] = None  # the student's start: the same forms as teacher_weights (null: random init)
    # a student (or a --teacher-only teacher) whose weights predict another class count than the data's:
    # null = a new head, with one line saying so; true = the same, asked for; false = refuse
    replace_head: Optional[bool] = None
    teacher_bn_mode: str = "eval"  # eval | train (train = the reference's batch-statistics teacher)
    sync_bn: bool = False
    channels_last: Optional[bool] = None  # null: on for CUDA, off on CPU
    compile: bool = False
    teacher_cache: str = "~/.cache/wsld/teachers"


@dataclass
class DistillConfig:
    loss: str = "wsld"  # ce | kd | wsld | dkd | dist (docs/method.md)
    # temperature (dist: tau); 0.5 is the built-in run's pick on held-out images (configs/fashion_mnist_wsld.yaml),
    # within 0.2 points of T 1-4 there; every shipped config sets its own
    T: float = 0.5
    # older spelling of the chosen loss's alpha (distill.params.<loss>.alpha); null in new configs
    alpha: Optional[float] = None
    label_smoothing: float = 0.0  # on the hard term only
    # each loss's own parameters, one section per loss, e.g. {wsld: {alpha: 2.5}, kd: {alpha: 0.9}};
    # only the chosen loss's section is read, an empty one means its defaults (docs/method.md):
    # wsld: alpha (soft-term weight, 2.5), weighting; kd: alpha (mixing weight in [0, 1], 0.9);
    # dkd: alpha (TCKD), beta, ce_weight, warmup_epochs; dist: beta, gamma, weight
    params: dict[str, Any] = field(default_factory=dict)
    soft_labels: Optional[str] = None  # stored teacher outputs (wsld soft-labels) instead of a teacher
    # distill from a teacher whose val top-1 is within 5 points of chance (normally a mistake: wrong weights or class order)
    allow_weak_teacher: bool = False


@dataclass
class TrainConfig:
    epochs: int = 3  # the built-in run: the demo's balanced regime
    # for a global batch of base_batch_size; scaled linearly with data.batch_size. The default is
    # the built-in WSLD run's, chosen by `wsld compare` on held-out images (configs/fashion_mnist_wsld.yaml)
    lr: float = 0.2
    base_batch_size: int = 256
    optimizer: str = "sgd"  # sgd | adamw
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4
    wd_norm_bias: bool = True  # decay norm and bias parameters too (the reference did)
    schedule: str = "cosine"  # cosine | step | multistep | constant
    step_size: int = 30  # step: lr x gamma every step_size epochs
    milestones: list[int] = field(default_factory=list)  # multistep
    gamma: float = 0.1
    warmup_epochs: float = 0.0  # linear warmup from 0 over this many (fractional) epochs, then the schedule
    grad_clip: float = 0.0  # max grad norm, 0 = off
    ema_decay: float = 0.0  # EMA of student weights, 0 = off
    amp: str = "auto"  # auto | off | bf16 | fp16 (auto: bf16 on CUDA, fp16 on GPUs without bf16, off on CPU; fp16 is CUDA-only)
    seed: int = 0
    # torch CPU threads per process; 0 = auto: on CPU, the cores shared out among the processes of
    # this node (2 processes on 2 cores: 1 each; oversubscribed threads spin and run several times
    # slower); on CUDA or with OMP_NUM_THREADS set, torch's default
    threads: int = 0
    deterministic: bool = False  # torch deterministic algorithms (bit-exact resume on CPU; slower on GPU)
    eval_every: int = 1  # epochs
    nan_policy: str = "stop"  # stop | skip
    log_every: int = 50  # steps between metric lines
    progress: bool = True  # console progress bars


@dataclass
class TeacherTrainConfig:
    """How the teacher is trained when model.teacher_weights is null (built-in and custom data)."""

    epochs: int = 4  # the demo's balanced teacher
    lr: float = 0.2  # the built-in run's teacher rate, searched by `wsld compare`
    weight_decay: float = 5e-4
    schedule: str = "cosine"


@dataclass
class CheckpointConfig:
    every_steps: int = 0  # extra mid-epoch checkpoint every N optimizer steps (0: at epoch ends only)
    keep_every_epochs: int = 0  # also keep epoch_<n>.pt every K epochs besides last.pt/best.pt (0: off)


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    teacher_train: TeacherTrainConfig = field(default_factory=TeacherTrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)


def _explain(err: OmegaConfBaseException) -> str:
    key = getattr(err, "full_key", None) or getattr(err, "key", None)
    msg = str(err).splitlines()[0]
    if key:
        return f"config key '{key}': {msg}"
    return f"config: {msg}"


def _char_at(path: Path, line: int, column: int) -> str:
    try:
        text = path.read_text(encoding="utf-8").splitlines()[line]
    except (OSError, UnicodeDecodeError, IndexError):
        return ""
    return text[column] if column < len(text) else ""


def _yaml_syntax_error(path: Path, e: yaml.MarkedYAMLError) -> str:
    """``FILE, line L, column C: what is wrong`` (1-based, as editors count), plus where the open construct began."""
    mark = e.problem_mark or e.context_mark
    where = f", line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    what = e.problem or e.context or "syntax error"
    if e.context and e.context_mark is not None and e.problem_mark is not None and e.context_mark.line != e.problem_mark.line:
        what += f" ({e.context} at line {e.context_mark.line + 1}, column {e.context_mark.column + 1})"
    if mark is not None and _char_at(path, mark.line, mark.column) == "\t":
        what += " (a tab: YAML indents with spaces)"
    return f"config file {path}{where}: YAML syntax error: {what}"


def load_config(
    path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = (), *, base: Optional[dict] = None
) -> Config:
    """Defaults <- ``base`` (a saved config dict) <- YAML file <- dotted overrides, then validated.

    Raises UserError on any mistake, naming the key.
    """
    schema = OmegaConf.structured(Config)
    layers: list[Any] = [schema]
    if base is not None:
        try:
            layers.append(OmegaConf.create(base))
        except OmegaConfBaseException as e:
            raise UserError(_explain(e)) from None
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise UserError(f"config file not found: {p} (give a YAML file, e.g. configs/fashion_mnist_wsld.yaml)")
        try:
            loaded = OmegaConf.load(p)
        except yaml.MarkedYAMLError as e:
            raise UserError(_yaml_syntax_error(p, e)) from None
        except Exception as e:  # not UTF-8 text, or another PyYAML error without a position
            raise UserError(f"config file {p} is not valid YAML: {str(e).splitlines()[0]}") from None
        if not isinstance(loaded, DictConfig):
            raise UserError(f"config file {p} must hold a mapping of sections (data:, model:, ...)")
        layers.append(loaded)
    for item in overrides:
        if "=" not in item:
            raise UserError(f"override '{item}' is not key=value (e.g. train.epochs=10)")
    try:
        if overrides:
            layers.append(OmegaConf.from_dotlist(list(overrides)))
        merged = OmegaConf.merge(*layers)
        cfg: Config = OmegaConf.to_object(merged)  # type: ignore[assignment]
    except OmegaConfBaseException as e:
        raise UserError(_explain(e)) from None
    validate(cfg)
    return cfg


def config_from_dict(d: dict) -> Config:
    """Rebuild a Config from a saved (resolved) dict, e.g. from a checkpoint."""
    try:
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(Config), OmegaConf.create(d)))  # type: ignore[return-value]
    except OmegaConfBaseException as e:
        raise UserError(_explain(e)) from None


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def to_yaml(cfg: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def _choice(key: str, value: str, allowed) -> None:
    allowed = sorted(allowed)
    if value not in allowed:
        raise UserError(f"config key '{key}': '{value}' is not one of {', '.join(allowed)}")


INT64_MAX = 2**63 - 1  # torch, numpy and the checkpoint all hold integers as int64


def _numbers(node: Any, prefix: str = "") -> list[tuple[str, Any]]:
    """(dotted key, value) of every number in the config tree, list items under their list's key.

    ``distill.params`` (and the older ``distill.alpha``) are left to the loss registry, which knows each parameter's range.
    """
    out: list[tuple[str, Any]] = []
    for f in dataclasses.fields(node):
        key, value = f"{prefix}{f.name}", getattr(node, f.name)
        if dataclasses.is_dataclass(value):
            out += _numbers(value, key + ".")
        elif isinstance(value, list):
            out += [(key, v) for v in value if isinstance(v, (int, float)) and not isinstance(v, bool)]
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out.append((key, value))
    return out


def _require(key: str, value: Any, ok: bool, rule: str) -> None:
    if not ok:
        raise UserError(f"config key '{key}': must be {rule}, got {value}")


def _check_numbers(cfg: Config) -> None:
    """Every number finite and in its range, so a bad value stops the run here, not as a traceback later."""
    t = cfg.train
    _require("train.seed", t.seed, 0 <= t.seed <= INT64_MAX, "in [0, 2**63 - 1]")
    for key, v in _numbers(cfg):
        if isinstance(v, float):
            _require(key, v, math.isfinite(v), "a finite number")
        else:
            _require(key, v, -INT64_MAX - 1 <= v <= INT64_MAX, "a 64-bit integer")
    d, tt = cfg.data, cfg.teacher_train
    at_least_one = [
        ("data.batch_size", d.batch_size), ("data.image_size", d.image_size), ("data.val_resize", d.val_resize),
        ("train.epochs", t.epochs), ("train.base_batch_size", t.base_batch_size), ("train.step_size", t.step_size),
        ("train.eval_every", t.eval_every), ("teacher_train.epochs", tt.epochs),
    ]  # fmt: skip
    if d.val_batch_size is not None:
        at_least_one.append(("data.val_batch_size", d.val_batch_size))
    for key, value in at_least_one:
        _require(key, value, value >= 1, ">= 1")
    for key, value in [
        ("data.workers", d.workers), ("data.crop_padding", d.crop_padding),
        ("data.color_jitter", d.color_jitter), ("train.lr", t.lr), ("train.weight_decay", t.weight_decay),
        ("train.warmup_epochs", t.warmup_epochs), ("train.grad_clip", t.grad_clip), ("train.threads", t.threads),
        ("train.log_every", t.log_every), ("teacher_train.lr", tt.lr), ("teacher_train.weight_decay", tt.weight_decay),
        ("checkpoint.every_steps", cfg.checkpoint.every_steps), ("checkpoint.keep_every_epochs", cfg.checkpoint.keep_every_epochs),
    ]:  # fmt: skip
        _require(key, value, value >= 0, ">= 0")
    _require("distill.T", cfg.distill.T, cfg.distill.T > 0, "> 0")
    _require("train.gamma", t.gamma, t.gamma > 0, "> 0")
    _require("distill.label_smoothing", cfg.distill.label_smoothing, 0 <= cfg.distill.label_smoothing < 1, "in [0, 1)")
    _require("train.momentum", t.momentum, 0 <= t.momentum < 1, "in [0, 1)")
    _require("train.ema_decay", t.ema_decay, 0 <= t.ema_decay < 1, "in [0, 1) (0 turns EMA off)")
    _require("data.min_scale", d.min_scale, 0 < d.min_scale <= 1, "in (0, 1]")
    _require("data.long_tail_ratio", d.long_tail_ratio, d.long_tail_ratio >= 1, ">= 1 (1 = balanced)")
    _require("data.holdout", d.holdout, 0 <= d.holdout < 1, "in [0, 1) (0: train on the whole training split)")
    _require("train.milestones", t.milestones, all(m >= 1 for m in t.milestones), "epochs >= 1")
    for key, v in [("data.mean", d.mean), ("data.std", d.std)]:
        _require(key, v, v is None or len(v) in (1, 3), "1 or 3 values")
    _require("data.std", d.std, d.std is None or all(x > 0 for x in d.std), "> 0 (it divides the pixels)")
    _check_upper_bounds(cfg)


# Upper bounds: past them a value breaks something later (a float32 overflow, a tensor too large to
# allocate, a process per worker), so it stops here instead, with the bound (README, config keys).
# train.lr, teacher_train.lr and the weight decays: scaled by batch_size / base_batch_size (at most
# 2**20) they stay within float32 (3.4e38, where the optimiser overflowed); absurd values below it
# still run, and diverge into the one-line stop of train.nan_policy (exit 3)
MAX_LR = 1e30
MAX_WEIGHT_DECAY = 1e30
MAX_BATCH = 2**20  # data.batch_size, val_batch_size, batch_size_per_device, train.base_batch_size
MAX_EPOCHS = 10**6
MAX_IMAGE_SIZE = 4096  # data.image_size (a 4096 x 4096 RGB crop is 48 MiB); data.val_resize: 2x that
MAX_WORKERS = 256  # data.workers (processes per training process) and train.threads
MAX_TEMPERATURE = 1e4
MIN_TEMPERATURE = 1e-2  # logits / T must stay finite in float16/bfloat16
MAX_LONG_TAIL_RATIO = 1e6
MAX_NORM_VALUE = 1e4  # |data.mean|, data.std (and std >= 1 / MAX_NORM_VALUE): pixels are in [0, 1]


def _check_upper_bounds(cfg: Config) -> None:
    d, t, tt = cfg.data, cfg.train, cfg.teacher_train
    for key, v, top in [
        ("train.lr", t.lr, MAX_LR), ("teacher_train.lr", tt.lr, MAX_LR),
        ("train.weight_decay", t.weight_decay, MAX_WEIGHT_DECAY),
        ("teacher_train.weight_decay", tt.weight_decay, MAX_WEIGHT_DECAY),
        ("data.batch_size", d.batch_size, MAX_BATCH), ("data.val_batch_size", d.val_batch_size, MAX_BATCH),
        ("data.batch_size_per_device", d.batch_size_per_device, MAX_BATCH),
        ("train.base_batch_size", t.base_batch_size, MAX_BATCH),
        ("train.epochs", t.epochs, MAX_EPOCHS), ("teacher_train.epochs", tt.epochs, MAX_EPOCHS),
        ("train.warmup_epochs", t.warmup_epochs, MAX_EPOCHS), ("train.step_size", t.step_size, MAX_EPOCHS),
        ("train.eval_every", t.eval_every, MAX_EPOCHS),
        ("data.image_size", d.image_size, MAX_IMAGE_SIZE), ("data.val_resize", d.val_resize, 2 * MAX_IMAGE_SIZE),
        ("data.crop_padding", d.crop_padding, d.image_size),
        ("data.workers", d.workers, MAX_WORKERS), ("train.threads", t.threads, MAX_WORKERS),
        ("data.color_jitter", d.color_jitter, 1.0), ("train.gamma", t.gamma, 100.0),
        ("distill.T", cfg.distill.T, MAX_TEMPERATURE), ("data.long_tail_ratio", d.long_tail_ratio, MAX_LONG_TAIL_RATIO),
    ]:  # fmt: skip
        if v is not None:
            _require(key, v, v <= top, f"at most {top:g}" if isinstance(top, float) else f"at most {top}")
    _require("distill.T", cfg.distill.T, cfg.distill.T >= MIN_TEMPERATURE, f"at least {MIN_TEMPERATURE:g}")
    _require("train.milestones", t.milestones, all(m <= MAX_EPOCHS for m in t.milestones), f"epochs <= {MAX_EPOCHS}")
    if d.mean is not None:
        _require("data.mean", d.mean, all(abs(x) <= MAX_NORM_VALUE for x in d.mean), f"values within +-{MAX_NORM_VALUE:g}")
    if d.std is not None:
        _require("data.std", d.std, all(1 / MAX_NORM_VALUE <= x <= MAX_NORM_VALUE for x in d.std),
                 f"values in [{1 / MAX_NORM_VALUE:g}, {MAX_NORM_VALUE:g}]")


def _resolve_batch(d: DataConfig) -> None:
    """``data.batch_size_per_device`` -> the global ``data.batch_size`` for this launch's process count."""
    if d.batch_size_per_device is None:
        return
    per, world = d.batch_size_per_device, int(os.environ.get("WORLD_SIZE") or 1)
    _require("data.batch_size_per_device", per, isinstance(per, int) and 1 <= per <= MAX_BATCH, f"in [1, {MAX_BATCH}]")
    if d.batch_size not in (DataConfig.batch_size, per * world):
        raise UserError(f"config keys 'data.batch_size' ({d.batch_size}, global) and 'data.batch_size_per_device' "
                        f"({per} x {world} processes = {per * world}) disagree: give one of the two")
    d.batch_size, d.batch_size_per_device = per * world, None


def validate(cfg: Config) -> None:
    """Range and name checks that the type system cannot express."""
    from wsld.losses.registry import LOSSES, resolve_loss_params

    _resolve_batch(cfg.data)
    _check_numbers(cfg)
    _choice("distill.loss", cfg.distill.loss, LOSSES)
    cfg.distill.params = resolve_loss_params(cfg.distill.loss, cfg.distill.params, cfg.distill.alpha)
    cfg.distill.alpha = None  # now in distill.params.<loss>.alpha
    _choice("data.format", cfg.data.format, {"builtin", "folder", "list", "lmdb"})
    _choice("data.on_corrupt", cfg.data.on_corrupt, {"skip", "stop"})
    _choice("data.decode", cfg.data.decode, {"cpu", "gpu", "auto"})
    _choice("model.teacher_bn_mode", cfg.model.teacher_bn_mode, {"eval", "train"})
    _choice("train.optimizer", cfg.train.optimizer, {"sgd", "adamw"})
    _choice("train.schedule", cfg.train.schedule, {"cosine", "step", "multistep", "constant"})
    _choice("teacher_train.schedule", cfg.teacher_train.schedule, {"cosine", "step", "multistep", "constant"})
    if cfg.train.amp in ("False", "false"):  # YAML reads `off` (and `false`) as a boolean
        cfg.train.amp = "off"
    _choice("train.amp", cfg.train.amp, {"auto", "off", "bf16", "fp16"})
    _choice("train.nan_policy", cfg.train.nan_policy, {"stop", "skip"})
    _choice("data.train_crop", cfg.data.train_crop, {"resized", "padded"})
    if cfg.data.format == "builtin":
        from wsld.data.builtin import BUILTIN_DATASETS

        _choice("data.dataset", cfg.data.dataset, BUILTIN_DATASETS)
    elif not cfg.data.data_path:
        raise UserError(f"config key 'data.data_path': required for data.format={cfg.data.format} (the dataset root)")
