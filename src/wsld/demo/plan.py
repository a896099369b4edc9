"""The demo's settings, its runs (one config each), their dependency order and the learning-rate choice."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from wsld.errors import UserError

VARIANTS = {"balanced": 1.0, "long-tail": 100.0}  # name -> data.long_tail_ratio
LOSS_ROWS = [  # loss, row name in the reference table, distill settings (published values)
    ("ce", "Original (CE)", {"T": 4.0, "alpha": 2.25}),
    ("kd", "KD (T=4, alpha=0.9)", {"T": 4.0, "alpha": 0.9}),
    ("wsld", "WSLD (T=4, alpha=2.25)", {"T": 4.0, "alpha": 2.25}),
]
LOSS_NAMES = {"ce": "CE", "kd": "KD", "wsld": "WSLD"}
LOSS_COLORS = {"teacher": "#555555", "ce": "#1f77b4", "kd": "#ff7f0e", "wsld": "#2ca02c"}
# Learning rate (per 256 images, scaled linearly with the batch). The teacher uses 0.1. The student's
# is chosen per loss from STUDENT_LRS, the same search for every loss, on a held-out part of the
# training set: at 0.1 the BatchNorm-free student collapsed to a constant output under WSLD (its soft
# term's gradient is alpha T^2 = 36 times a KL's; seed 0 ended at 54.2% against 76.6% for CE), while
# CE learns slowly at 0.025. See docs/demo.md.
TEACHER_LR = 0.1
STUDENT_LRS = (0.1, 0.05, 0.025)
# Fashion-MNIST statistics (one grey channel, replicated over the 3 channels the PNGs decode to)
FMNIST_MEAN, FMNIST_STD = [0.2860], [0.3530]


@dataclass
class Settings:
    """Everything that shapes the demo's runs; the full and the quick demo differ only here."""

    seeds: int = 3
    variants: tuple[str, ...] = ("balanced", "long-tail")
    epochs: int = 10  # student epochs, every loss
    teacher_epochs: int = 8
    train_per_class: Optional[int] = None  # None: all 6,000 training images per class
    val_per_class: Optional[int] = None  # None: all 1,000 test images per class
    batch_size: int = 128
    jobs: int = 2
    threads: int = 1
    quick: bool = False
    source: Optional[str] = None  # folder with the Fashion-MNIST IDX files (None: the system location)
    # learning-rate selection: per class, the first tune_per_class training images train, the next
    # tune_per_class (also training images, never test images) are the held-out set
    tune_per_class: int = 1000
    tune_epochs: int = 4


FULL = dict(seeds=3, variants=("balanced", "long-tail"), epochs=10, teacher_epochs=8, tune_per_class=1000, tune_epochs=4)
QUICK = dict(seeds=1, variants=("balanced",), epochs=3, teacher_epochs=3, train_per_class=1000, tune_per_class=500,
             tune_epochs=2)


# --------------------------------------------------------------------------- runs


@dataclass
class RunSpec:
    name: str
    variant: str
    loss: str  # "teacher" for the teacher's own CE run
    seed: int
    config: Any  # wsld.config.Config
    config_path: Path
    run_dir: Path
    log_path: Path
    deps: list[str] = field(default_factory=list)
    cost: float = 1.0  # relative CPU cost, for the progress bar's ETA
    steps_total: int = 1

    @property
    def role(self) -> str:
        return "teacher" if self.loss == "teacher" else "student"


def run_config(lmdb_dir: Path, out: Path, s: Settings, variant: str, loss: str, seed: int,
               teacher_weights: Optional[Path], lr: Optional[float] = None, epochs: Optional[int] = None) -> Any:
    """The full config of one run: one recipe for every loss, only ``distill`` differs."""
    from wsld.config import config_from_dict, validate

    student = "cnn_teacher" if loss == "teacher" else "cnn_student"
    distill = {"loss": "ce", "T": 4.0, "alpha": 2.25}
    for name, _row, params in LOSS_ROWS:
        if name == loss:
            distill = {"loss": name, **params}
    d = {
        "data": {
            "dataset": "fashion-mnist", "format": "lmdb", "data_path": str(lmdb_dir.resolve()),
            "batch_size": s.batch_size, "workers": 0, "image_size": 28, "val_resize": 28,
            "train_crop": "padded", "crop_padding": 2, "hflip": True, "augment": True,
            "mean": FMNIST_MEAN, "std": FMNIST_STD, "long_tail_ratio": VARIANTS[variant],
        },
        "model": {
            "teacher": "cnn_teacher", "student": student,
            "teacher_weights": str(teacher_weights.resolve()) if teacher_weights and loss in ("kd", "wsld") else None,
            "teacher_bn_mode": "eval", "channels_last": True, "teacher_cache": str((out / "teacher_cache").resolve()),
        },
        "distill": distill,
        "train": {
            "epochs": epochs or (s.teacher_epochs if loss == "teacher" else s.epochs),
            "lr": TEACHER_LR if loss == "teacher" else lr, "base_batch_size": 256,
            "optimizer": "sgd", "momentum": 0.9, "nesterov": True, "weight_decay": 5e-4, "schedule": "cosine",
            "warmup_epochs": 0.0, "amp": "off", "seed": seed, "log_every": 25, "progress": True,
        },
        # unused (the teacher is its own run, then given as weights); pinned so that a new built-in
        # default does not make finished demo runs look like runs of other settings
        "teacher_train": {"epochs": 4, "lr": 0.1, "weight_decay": 5e-4, "schedule": "cosine"},
        "checkpoint": {"every_steps": 100},
    }  # fmt: skip
    cfg = config_from_dict(d)
    validate(cfg)
    return cfg


def train_counts(cfg: Any) -> tuple[list[int], int]:
    """Training images per class (after the long-tail cut) and the val size, as the engine sees them."""
    from wsld.data import build_datasets

    train, val, info = build_datasets(cfg.data, seed=cfg.train.seed)
    counts = [0] * info.num_classes
    for y in train.targets:
        counts[y] += 1
    return counts, len(val)


# relative CPU cost per image (about microseconds on one core): decode + augment + model work
COST_TRAIN = {"teacher": 750.0, "ce": 245.0, "kd": 400.0, "wsld": 400.0}
COST_EVAL = {"teacher": 270.0, "ce": 130.0, "kd": 130.0, "wsld": 130.0}


def _spec(out: Path, name: str, variant: str, loss: str, seed: int, cfg: Any, deps: list[str], n_train: int,
          n_val: int) -> RunSpec:
    epochs = cfg.train.epochs
    cost = epochs * (n_train * COST_TRAIN[loss] + n_val * COST_EVAL[loss])
    if loss in ("kd", "wsld"):
        cost += n_val * COST_EVAL["teacher"]
    steps = epochs * max(1, n_train // cfg.data.batch_size)
    return RunSpec(name, variant, loss, seed, cfg, out / "configs" / f"{name}.yaml", out / "runs" / name,
                   out / "logs" / f"{name}.log", deps, cost, steps)


def plan_teachers_and_tuning(out: Path, lmdb_dir: Path, tune_lmdb: Path, s: Settings) -> tuple[list[RunSpec], dict[str, dict]]:
    """Phase 1: the teacher of every variant (the balanced one always: the tuning runs use it) and the
    learning-rate search (every loss x every rate in STUDENT_LRS, seed 0, on the tuning split)."""
    specs: list[RunSpec] = []
    variants: dict[str, dict] = {}
    for variant in dict.fromkeys(("balanced", *s.variants)):
        tcfg = run_config(lmdb_dir, out, s, variant, "teacher", 0, None)
        counts, n_val = train_counts(tcfg)
        if variant in s.variants:
            variants[variant] = {"class_counts": counts, "train_images": sum(counts), "val_images": n_val}
        specs.append(_spec(out, f"{variant}-teacher", variant, "teacher", 0, tcfg, [], sum(counts), n_val))
    teacher = out / "runs" / "balanced-teacher" / "last.pt"
    n_train = n_val = 0
    for loss, _row, _p in LOSS_ROWS:
        for lr in STUDENT_LRS:
            cfg = run_config(tune_lmdb, out, s, "balanced", loss, 0, teacher, lr=lr, epochs=s.tune_epochs)
            if not n_train:
                counts, n_val = train_counts(cfg)
                n_train = sum(counts)
            deps = ["balanced-teacher"] if loss != "ce" else []
            specs.append(_spec(out, f"tune-{loss}-lr{lr:g}", "tune", loss, 0, cfg, deps, n_train, n_val))
    return specs, variants


def select_lrs(specs: list[RunSpec]) -> dict[str, dict]:
    """Per loss, the rate whose run ends best on the held-out images (ties: the first in STUDENT_LRS)."""
    out: dict[str, dict] = {}
    for loss, _row, _p in LOSS_ROWS:
        table: dict[str, float] = {}
        for sp in specs:
            if sp.variant == "tune" and sp.loss == loss:
                summary = json.loads((sp.run_dir / "summary.json").read_text(encoding="utf-8"))
                table[f"{sp.config.train.lr:g}"] = summary["last_top1"]
        best = None
        for lr in STUDENT_LRS:
            if best is None or table[f"{lr:g}"] > table[f"{best:g}"]:
                best = lr
        out[loss] = {"lr": best, "heldout_top1": table}
    return out


def plan_students(out: Path, lmdb_dir: Path, s: Settings, variants: dict[str, dict], lrs: dict[str, dict]) -> list[RunSpec]:
    """Phase 2: every loss and seed on every variant, each loss with its selected learning rate."""
    specs = []
    for variant, info in variants.items():
        tname = f"{variant}-teacher"
        for seed in range(s.seeds):
            for loss, _row, _p in LOSS_ROWS:
                cfg = run_config(lmdb_dir, out, s, variant, loss, seed, out / "runs" / tname / "last.pt", lr=lrs[loss]["lr"])
                specs.append(_spec(out, f"{variant}-{loss}-s{seed}", variant, loss, seed, cfg,
                                   [tname] if loss != "ce" else [], info["train_images"], info["val_images"]))
    return specs


def write_configs(specs: list[RunSpec]) -> None:
    from wsld.checkpoint import atomic_write_text
    from wsld.config import to_yaml

    for sp in specs:
        sp.config_path.parent.mkdir(parents=True, exist_ok=True)
        what = "the teacher (CE)" if sp.loss == "teacher" else f"the student with {sp.loss}, seed {sp.seed}"
        if sp.variant == "tune":
            what = (f"learning-rate search, the student with {sp.loss} at lr {sp.config.train.lr:g} "
                    "(val = held-out training images)")
        header = (
            f"# wsld demo, {sp.variant}: {what}. Written by `wsld demo`; rerun by hand with\n"
            f"#   wsld train {sp.config_path} --out RUN_DIR\n"
        )
        if sp.deps:
            header += f"# (model.teacher_weights is the last.pt of the run {sp.deps[0]}, configs/{sp.deps[0]}.yaml)\n"
        atomic_write_text(sp.config_path, header + to_yaml(sp.config))


def run_state(sp: RunSpec) -> str:
    """``done`` (summary.json), ``resume`` (a checkpoint) or ``fresh``; refuses a run directory that
    holds a run of other settings (the demo would otherwise mix old and new numbers)."""
    from wsld.config import load_config, to_dict
    from wsld.engine.rundir import RESUME_SAFE_KEYS, config_diff

    saved = sp.run_dir / "config.yaml"
    has_ckpt = (sp.run_dir / "last.pt").is_file()
    done = (sp.run_dir / "summary.json").is_file()
    if not (has_ckpt or done):
        return "fresh"
    if saved.is_file():
        diff = [k for k in config_diff(to_dict(load_config(saved)), to_dict(sp.config)) if k not in RESUME_SAFE_KEYS]
        if diff:
            raise UserError(
                f"{sp.run_dir} holds a run made with other settings ({', '.join(diff[:4])}): give the demo another "
                f"--out, or the same options as before (e.g. --quick, --epochs, --limit-per-class)"
            )
    return "done" if done else "resume"


def train_argv(sp: RunSpec, state: str) -> list[str]:
    """The ``wsld train`` arguments of a run (progress bars off: the demo shows its own)."""
    if state == "resume":
        return ["train", str(sp.config_path), "--resume", str(sp.run_dir), "train.progress=false"]
    return ["train", str(sp.config_path), "--out", str(sp.run_dir), "train.progress=false"]

