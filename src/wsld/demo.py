"""``wsld demo``: the reference comparison (teacher / student alone / KD / WSLD) on real data.

The demo does what a user does on ImageNet, on the Fashion-MNIST photos that install with the tool:

1. export the built-in data as an ImageNet-shaped folder ``OUT/data/fashion-mnist/{train,val}/<class>/*.png``
   (class folders named ``0_T-shirt_top`` ... so that sorted order is label order; the 10,000 test
   images are ``val``);
2. ``wsld data list`` and ``wsld data pack`` (both splits) into ``.../lmdb``;
3. write one YAML config per run into ``OUT/configs/`` and train each one with ``wsld train`` from the
   LMDB: per variant (balanced, long-tailed) the teacher once (CE), then the student with ``ce``,
   ``kd`` and ``wsld`` for every seed, the KD/WSLD runs reading the teacher's ``last.pt``;
4. collect ``summary.json`` / ``metrics.jsonl`` of every run into ``OUT/results.json``,
   ``OUT/report.md`` and PNG plots under ``OUT/plots/``.

Runs go through the same engine and config system as ``wsld train``; with ``--jobs N > 1`` they
run as N parallel ``wsld train`` processes (one thread each on a small CPU machine: the small CNNs
do not profit from intra-op threads, two processes do), with ``--jobs 1`` in this process. A
finished run (``summary.json``) is reused, an unfinished one resumed (``wsld train --resume``), so
re-running the same command after an interruption continues where it stopped. See docs/demo.md.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

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


# --------------------------------------------------------------------------- data


def class_folder_names(classes: list[str]) -> list[str]:
    """``0_T-shirt_top`` ...: the label first, so sorted folder order is label order."""
    width = len(str(len(classes) - 1))
    return [f"{k:0{width}d}_{re.sub(r'[^A-Za-z0-9-]+', '_', name).strip('_')}" for k, name in enumerate(classes)]


def data_folder_name(train_per_class: Optional[int], val_per_class: Optional[int]) -> str:
    if train_per_class is None and val_per_class is None:
        return "fashion-mnist"
    return f"fashion-mnist-{train_per_class or 'all'}-{val_per_class or 'all'}"


def _selected(labels: list[int], per_class: Optional[int], skip: int = 0) -> list[int]:
    """Indices to export: all, or per class the images ``skip`` .. ``skip + per_class - 1`` in file order."""
    if per_class is None and not skip:
        return list(range(len(labels)))
    seen: dict[int, int] = {}
    keep = []
    for i, y in enumerate(labels):
        n = seen.get(y, 0)
        seen[y] = n + 1
        if n >= skip and (per_class is None or n < skip + per_class):
            keep.append(i)
    return keep


# folder split -> (Fashion-MNIST split, images per class to skip, images per class or None for all)
ExportPlan = dict[str, tuple[str, int, Optional[int]]]


def export_fashion_mnist(root: Path, plan: ExportPlan, source: Optional[str] = None, workers: int = 2,
                         log: Callable[[str], None] = print) -> Path:
    """Write Fashion-MNIST images as ``root/<split>/<class>/<index>.png`` (grey PNGs) as ``plan`` says.

    Written into a temporary folder renamed at the end, so ``root`` exists only when complete; an
    export interrupted half-way is started again next time.
    """
    import numpy as np
    from PIL import Image

    from wsld.data.builtin import FASHION_MNIST_CLASSES, load_fashion_mnist

    if root.is_dir():
        return root
    tmp = root.parent / f".{root.name}.partial"
    if tmp.exists():
        shutil.rmtree(tmp)
    folders = class_folder_names(FASHION_MNIST_CLASSES)
    t0 = time.perf_counter()
    total = 0
    for split, (source_split, skip, per_class) in plan.items():
        images, labels = load_fashion_mnist(source_split, source)
        pixels = images[:, 0].numpy()
        keep = _selected(labels, per_class, skip)
        width = len(str(len(labels) - 1))
        for name in folders:
            (tmp / split / name).mkdir(parents=True, exist_ok=True)

        def write(i: int) -> None:
            path = tmp / split / folders[labels[i]] / f"{i:0{width}d}.png"
            Image.fromarray(np.ascontiguousarray(pixels[i])).save(path)

        with ThreadPoolExecutor(max(1, workers)) as pool:
            list(pool.map(write, keep, chunksize=256))
        total += len(keep)
    os.replace(tmp, root)
    log(f"exported {total:,} Fashion-MNIST images as PNG files to {root} ({time.perf_counter() - t0:.0f} s)")
    return root


def prepare_data(root: Path, plan: ExportPlan, s: Settings, log: Callable[[str], None]) -> tuple[Path, list[str]]:
    """Export, ``wsld data list``, ``wsld data pack`` (train and val): the LMDB folder and the
    commands a user would have typed."""
    from wsld.data.lists import write_lists
    from wsld.data.lmdb_reader import open_lmdb_index
    from wsld.data.pack import pack_lmdb
    from wsld.errors import DataError

    lmdb_dir = root / "lmdb"
    commands = [f"wsld data list {root}"] + [f"wsld data pack {root} --split {split}" for split in ("train", "val")]

    def complete() -> bool:
        try:
            for split in ("train", "val"):
                open_lmdb_index(lmdb_dir / split, require_complete=True)
        except (DataError, OSError):
            return False
        return True

    if root.is_dir() and complete():
        log(f"data: reusing {lmdb_dir}")
        return lmdb_dir, commands
    export_fashion_mnist(root, plan, s.source, workers=max(2, s.jobs), log=log)
    lists = write_lists(root, log=log)
    log(f"wsld data list {root}: " + ", ".join(f"{k} {len(v):,} images" for k, v in lists.items()))
    for split in ("train", "val"):
        res = pack_lmdb(root, split, workers=max(2, s.jobs), progress=False, log=log)
        log(f"wsld data pack {root} --split {split}: {res.count:,} images in {res.path}")
    return lmdb_dir, commands


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


def _train_counts(cfg: Any) -> tuple[list[int], int]:
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
        counts, n_val = _train_counts(tcfg)
        if variant in s.variants:
            variants[variant] = {"class_counts": counts, "train_images": sum(counts), "val_images": n_val}
        specs.append(_spec(out, f"{variant}-teacher", variant, "teacher", 0, tcfg, [], sum(counts), n_val))
    teacher = out / "runs" / "balanced-teacher" / "last.pt"
    n_train = n_val = 0
    for loss, _row, _p in LOSS_ROWS:
        for lr in STUDENT_LRS:
            cfg = run_config(tune_lmdb, out, s, "balanced", loss, 0, teacher, lr=lr, epochs=s.tune_epochs)
            if not n_train:
                counts, n_val = _train_counts(cfg)
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
    from wsld.engine import RESUME_SAFE_KEYS, config_diff

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


def _run_progress(sp: RunSpec) -> float:
    """Fraction of a running run done, from the global step of its newest metrics line."""
    path = sp.run_dir / "metrics.jsonl"
    try:
        with open(path, "rb") as f:
            f.seek(max(0, path.stat().st_size - 4096))
            tail = f.read().decode("utf-8", "replace").splitlines()
    except OSError:
        return 0.0
    for line in reversed(tail):
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if "global_step" in rec:
            return min(1.0, float(rec["global_step"]) / max(1, sp.steps_total))
    return 0.0


def _log_tail(path: Path, lines: int = 4) -> str:
    try:
        text = path.read_text(encoding="utf-8", errors="replace").strip().splitlines()
    except OSError:
        return ""
    return " | ".join(text[-lines:])


class Runner:
    """Runs the planned runs in dependency order, ``jobs`` at a time, with one progress bar."""

    def __init__(self, specs: list[RunSpec], states: dict[str, str], s: Settings, progress: bool,
                 log: Callable[[str], None], stream):
        self.specs = {sp.name: sp for sp in specs}
        self.states = states
        self.s = s
        self.log = log
        self.stream = stream
        self.progress = progress
        self.done: set[str] = set()
        self.times: dict[str, float] = {}
        self.total_cost = sum(sp.cost for sp in specs)
        self.done_cost = 0.0
        self.bar = None
        self.running: dict[str, Any] = {}  # names of the runs in progress

    def _progress_value(self, running: dict[str, Any]) -> float:
        return self.done_cost + sum(self.specs[n].cost * _run_progress(self.specs[n]) for n in running)

    def _update(self, running: dict[str, Any]) -> None:
        if self.bar is not None:
            self.bar.n = min(self.total_cost, self._progress_value(running))
            self.bar.set_postfix_str(", ".join(sorted(running)) or "", refresh=False)
            self.bar.refresh()

    def _finished(self, name: str, seconds: float) -> None:
        sp = self.specs[name]
        self.done.add(name)
        self.done_cost += sp.cost
        self.times[name] = seconds
        try:
            summary = json.loads((sp.run_dir / "summary.json").read_text(encoding="utf-8"))
            top1 = f"top-1 {summary['last_top1']:.2f}"
        except (OSError, ValueError, KeyError):
            top1 = "no summary"
        eta = ""
        worked = self._progress_value(self.running) - self.start_cost
        if worked > 0 and len(self.done) < len(self.specs):
            left = self.total_cost - self._progress_value(self.running)
            eta = f", about {_duration((time.perf_counter() - self.t0) * left / worked)} left"
        self.log(f"finished {name}: {top1} ({_duration(seconds)}; {len(self.done)}/{len(self.specs)} runs done{eta})")

    def run(self) -> dict[str, float]:
        from tqdm import tqdm

        todo = []
        for sp in self.specs.values():
            state = self.states[sp.name]
            if state == "done":
                self.done.add(sp.name)
                self.done_cost += sp.cost
            else:
                todo.append((sp.name, state))
        if len(self.done):
            self.log(f"reusing {len(self.done)} finished run(s) in {next(iter(self.specs.values())).run_dir.parent}")
        if not todo:
            return self.times
        todo.sort(key=lambda item: self.specs[item[0]].loss != "teacher")  # teachers first: the others wait for them
        self.t0, self.start_cost = time.perf_counter(), self.done_cost
        self.bar = tqdm(total=self.total_cost, initial=self.done_cost, desc="wsld demo", file=self.stream,
                        disable=not (self.progress and self.stream.isatty()), dynamic_ncols=True, mininterval=1.0,
                        bar_format="{desc}: {percentage:3.0f}%|{bar}| [{elapsed}<{remaining}] {postfix}")
        try:
            if self.s.jobs <= 1:
                self._run_here(todo)
            else:
                self._run_processes(todo)
        finally:
            self.bar.close()
        return self.times

    def _ready(self, pending: list[tuple[str, str]]) -> Optional[tuple[str, str]]:
        for item in pending:  # planned order: teachers first, then seeds; a blocked run waits
            if all(d in self.done or d not in self.specs for d in self.specs[item[0]].deps):  # others: an earlier phase
                return item
        return None

    def _fail(self, name: str, why: str) -> UserError:
        sp = self.specs[name]
        tail = _log_tail(sp.log_path)
        return UserError(f"demo run {name} failed ({why}); log: {sp.log_path}" + (f": {tail}" if tail else "")
                         + "; fix the cause and run the same command again to continue")

    def _run_here(self, todo: list[tuple[str, str]]) -> None:
        """One run at a time in this process, exactly as ``wsld train`` (the CLI's main)."""
        import torch

        from wsld.cli import main

        stop = threading.Event()
        current = self.running

        def monitor() -> None:
            while not stop.wait(1.0):
                self._update(current)

        watcher = threading.Thread(target=monitor, daemon=True)
        watcher.start()
        threads, env_threads = torch.get_num_threads(), os.environ.get("OMP_NUM_THREADS")
        torch.set_num_threads(max(1, self.s.threads))
        os.environ["OMP_NUM_THREADS"] = str(max(1, self.s.threads))  # the engine keeps a thread count set so
        try:
            pending = list(todo)
            while pending:
                item = self._ready(pending)
                if item is None:
                    raise self._fail(pending[0][0], "a run it needs did not finish")
                pending.remove(item)
                name, state = item
                sp = self.specs[name]
                current.clear()
                current[name] = True
                sp.log_path.parent.mkdir(parents=True, exist_ok=True)
                t0 = time.perf_counter()
                with open(sp.log_path, "a", encoding="utf-8") as logf, contextlib.redirect_stdout(logf), \
                        contextlib.redirect_stderr(logf):
                    print(f"$ wsld {' '.join(train_argv(sp, state))}", flush=True)
                    rc = main(train_argv(sp, state))
                current.clear()
                if rc == 130:  # Ctrl-C: the run keeps its checkpoint, the next demo resumes it
                    raise KeyboardInterrupt
                if rc != 0 or not (sp.run_dir / "summary.json").is_file():
                    raise self._fail(name, f"exit status {rc}")
                self._finished(name, time.perf_counter() - t0)
                self._update(current)
        finally:
            stop.set()
            torch.set_num_threads(threads)
            if env_threads is None:
                os.environ.pop("OMP_NUM_THREADS", None)
            else:
                os.environ["OMP_NUM_THREADS"] = env_threads

    def _run_processes(self, todo: list[tuple[str, str]]) -> None:
        """``jobs`` parallel ``wsld train`` processes with ``threads`` threads each."""
        env = dict(os.environ)
        env.update(OMP_NUM_THREADS=str(self.s.threads), MKL_NUM_THREADS=str(self.s.threads), PYTHONUNBUFFERED="1")
        pending = list(todo)
        running: dict[str, tuple[subprocess.Popen, float, Any]] = self.running
        try:
            while pending or running:
                while len(running) < self.s.jobs:
                    item = self._ready(pending)
                    if item is None:
                        break
                    pending.remove(item)
                    name, state = item
                    sp = self.specs[name]
                    sp.log_path.parent.mkdir(parents=True, exist_ok=True)
                    logf = open(sp.log_path, "a", encoding="utf-8")
                    argv = train_argv(sp, state)
                    logf.write(f"$ wsld {' '.join(argv)}\n")
                    logf.flush()
                    proc = subprocess.Popen([sys.executable, "-m", "wsld", *argv], stdout=logf, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, env=env)
                    running[name] = (proc, time.perf_counter(), logf)
                if not running:
                    raise self._fail(pending[0][0], "a run it needs did not finish")
                time.sleep(0.5)
                for name, (proc, t0, logf) in list(running.items()):
                    rc = proc.poll()
                    if rc is None:
                        continue
                    logf.close()
                    del running[name]
                    if rc != 0 or not (self.specs[name].run_dir / "summary.json").is_file():
                        raise self._fail(name, f"exit status {rc}")
                    self._finished(name, time.perf_counter() - t0)
                self._update(running)
        finally:  # interrupted or failed: stop the others (their checkpoints let the next demo resume them)
            for proc, _t0, logf in running.values():
                if proc.poll() is None:
                    proc.terminate()
            for proc, _t0, logf in running.values():
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
                logf.close()


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


# --------------------------------------------------------------------------- results


def read_metrics(run_dir: Path) -> list[dict]:
    out = []
    path = run_dir / "metrics.jsonl"
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
    return out


def mean_std(values: list[float]) -> tuple[float, Optional[float]]:
    """Mean and sample standard deviation (n - 1); no std for a single value."""
    n = len(values)
    m = sum(values) / n
    if n < 2:
        return m, None
    return m, math.sqrt(sum((v - m) ** 2 for v in values) / (n - 1))


def class_groups(counts: list[int]) -> dict[str, list[int]]:
    """Head / middle / tail: the first, middle and last third of classes by training count
    (ties in label order); 10 classes split 3 / 4 / 3."""
    order = sorted(range(len(counts)), key=lambda k: (-counts[k], k))
    c = len(order)
    k = c // 3
    return {"head": order[:k], "middle": order[k : c - k], "tail": order[c - k :]}


def _per_epoch(records: list[dict], kind: str, key: str) -> dict[int, Any]:
    out: dict[int, Any] = {}
    for r in records:
        if r.get("kind") == kind and "epoch" in r:
            out[int(r["epoch"])] = r[key]
    return out


def collect(specs: list[RunSpec], variants: dict[str, dict], classes: list[str]) -> dict[str, Any]:
    """``results.json``'s ``variants`` part, from the runs' summary.json and metrics.jsonl."""
    res: dict[str, Any] = {}
    for variant, info in variants.items():
        counts = info["class_counts"]
        groups = class_groups(counts)
        teacher_spec = next(sp for sp in specs if sp.variant == variant and sp.loss == "teacher")
        tsum = json.loads((teacher_spec.run_dir / "summary.json").read_text(encoding="utf-8"))
        tcurve = _per_epoch(read_metrics(teacher_spec.run_dir), "eval", "top1")
        tpc = tsum["last_per_class_top1"]
        v: dict[str, Any] = {
            **info,
            "classes": classes,
            "groups": groups,
            "teacher": {
                "run": teacher_spec.name, "top1": tsum["last_top1"], "best_top1": tsum["best_top1"],
                "per_class_top1": tpc, "group_top1": {g: sum(tpc[k] for k in ks) / len(ks) for g, ks in groups.items()},
                "curve": [tcurve[e] for e in sorted(tcurve)],
            },
            "losses": {},
        }  # fmt: skip
        for loss, row, params in LOSS_ROWS:
            runs = sorted((sp for sp in specs if sp.variant == variant and sp.loss == loss), key=lambda sp: sp.seed)
            seeds = []
            for sp in runs:
                summ = json.loads((sp.run_dir / "summary.json").read_text(encoding="utf-8"))
                recs = read_metrics(sp.run_dir)
                curve = _per_epoch(recs, "eval", "top1")
                weights = _per_epoch(recs, "class_weights", "mean_weight")
                pc = summ["last_per_class_top1"]
                seeds.append({
                    "seed": sp.seed, "run": sp.name, "top1": summ["last_top1"], "best_top1": summ["best_top1"],
                    "best_epoch": summ["best_epoch"], "per_class_top1": pc,
                    "group_top1": {g: sum(pc[k] for k in ks) / len(ks) for g, ks in groups.items()},
                    "curve": [curve[e] for e in sorted(curve)],
                    "class_weights": [weights[e] for e in sorted(weights)] if weights else None,
                    "teacher_top1_seen": summ.get("teacher_top1"),
                })  # fmt: skip
            m, sd = mean_std([r["top1"] for r in seeds])
            ncls = len(classes)
            entry = {
                "row": row, "distill": {"loss": loss, **({} if loss == "ce" else params)},
                "seeds": seeds, "top1_mean": m, "top1_std": sd,
                "per_class_top1_mean": [sum(r["per_class_top1"][k] for r in seeds) / len(seeds) for k in range(ncls)],
                "group_top1": {g: dict(zip(("mean", "std"), mean_std([r["group_top1"][g] for r in seeds]))) for g in groups},
            }  # fmt: skip
            if seeds[0]["class_weights"]:
                epochs = len(seeds[0]["class_weights"])
                entry["class_weights_mean"] = [
                    [sum(r["class_weights"][e][k] for r in seeds) / len(seeds) for k in range(ncls)] for e in range(epochs)
                ]
            v["losses"][loss] = entry
        for other in ("ce", "kd"):  # paired by seed: same initialisation and data order for every loss
            diffs = [w["top1"] - o["top1"] for w, o in zip(v["losses"]["wsld"]["seeds"], v["losses"][other]["seeds"])]
            m, sd = mean_std(diffs)
            v[f"wsld_minus_{other}"] = {"mean": m, "std": sd, "per_seed": diffs, "wsld_ahead": sum(d > 0 for d in diffs)}
        res[variant] = v
    return res


# --------------------------------------------------------------------------- plots


def _save_figure(fig, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110, bbox_inches="tight")
    os.replace(tmp, path)


def make_plots(results: dict[str, Any], plots: Path, seeds: int) -> list[Path]:
    """The PNG figures of the report; returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.ticker import MaxNLocator

    written: list[Path] = []
    seed_note = f"mean over {seeds} seed{'s' if seeds > 1 else ''}"
    titles = {"balanced": "balanced", "long-tail": "long-tailed (ratio 100)"}

    # 1. test top-1 per epoch, per variant
    for variant, v in results.items():
        fig, ax = plt.subplots(figsize=(7, 4.2))
        for loss, entry in v["losses"].items():
            curves = np.array([r["curve"] for r in entry["seeds"]], dtype=float)
            x = np.arange(1, curves.shape[1] + 1)
            ax.plot(x, curves.mean(0), marker="o", ms=3, color=LOSS_COLORS[loss], label=LOSS_NAMES[loss])
            if len(curves) > 1:
                ax.fill_between(x, curves.min(0), curves.max(0), color=LOSS_COLORS[loss], alpha=0.15)
        ax.axhline(v["teacher"]["top1"], color=LOSS_COLORS["teacher"], ls="--", label=f"teacher ({v['teacher']['top1']:.2f})")
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel("test top-1 (%)")
        band = ", band = min..max over seeds" if seeds > 1 else ""
        ax.set_title(f"Fashion-MNIST {titles[variant]}: student test top-1 per epoch\n({seed_note}{band})")
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right")
        path = plots / f"curves_{variant}.png"
        _save_figure(fig, path)
        plt.close(fig)
        written.append(path)

    # 2. final top-1 with error bars over seeds
    fig, ax = plt.subplots(figsize=(7, 4.2))
    names = ["teacher", "ce", "kd", "wsld"]
    width = 0.8 / len(names)
    lows = []
    for i, name in enumerate(names):
        xs, ys, es = [], [], []
        for j, (variant, v) in enumerate(results.items()):
            if name == "teacher":
                y, e = v["teacher"]["top1"], 0.0
            else:
                y, e = v["losses"][name]["top1_mean"], v["losses"][name]["top1_std"] or 0.0
            xs.append(j + (i - (len(names) - 1) / 2) * width)
            ys.append(y)
            es.append(e)
            lows.append(y)
        label = "teacher (1 run)" if name == "teacher" else LOSS_NAMES[name]
        bars = ax.bar(xs, ys, width, yerr=es, capsize=3, color=LOSS_COLORS[name], label=label)
        ax.bar_label(bars, labels=[f"{y:.1f}" for y in ys], fontsize=7, padding=2)
    ax.set_xticks(range(len(results)), [titles[v] for v in results])
    ax.set_ylim(max(0.0, math.floor(min(lows) / 5) * 5 - 5), 100)
    ax.set_ylabel("test top-1 (%), last epoch")
    ax.set_title(f"Fashion-MNIST: final test top-1 ({seed_note}, error bar = std over seeds)")
    ax.legend(loc="upper right", fontsize=8, ncol=4)
    ax.grid(axis="y", alpha=0.3)
    path = plots / "final_top1.png"
    _save_figure(fig, path)
    plt.close(fig)
    written.append(path)

    # 3. WSLD weight per class per epoch, next to per-class accuracy of CE vs WSLD
    for variant, v in results.items():
        weights = v["losses"]["wsld"].get("class_weights_mean")
        if not weights:
            continue
        w = np.array(weights, dtype=float).T  # classes x epochs
        classes = v["classes"]
        counts = v["class_counts"]
        labels = [f"{c} ({n:,})" for c, n in zip(classes, counts)]
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.8), gridspec_kw={"width_ratios": [1.15, 1]})
        im = ax1.imshow(w, aspect="auto", cmap="viridis", origin="upper",
                        extent=(0.5, w.shape[1] + 0.5, len(classes) - 0.5, -0.5))
        ax1.set_yticks(range(len(classes)), labels)
        ax1.set_xlabel("epoch")
        ax1.set_xticks(range(1, w.shape[1] + 1))
        ax1.set_title(f"mean WSLD sample weight per class and epoch\n({seed_note}; class (training images))")
        fig.colorbar(im, ax=ax1, label="mean weight 1 - exp(-CE_s / CE_t)")
        y = np.arange(len(classes))
        ce_acc = v["losses"]["ce"]["per_class_top1_mean"]
        ws_acc = v["losses"]["wsld"]["per_class_top1_mean"]
        ax2.barh(y - 0.2, ce_acc, 0.4, color=LOSS_COLORS["ce"], label="CE (student alone)")
        ax2.barh(y + 0.2, ws_acc, 0.4, color=LOSS_COLORS["wsld"], label="WSLD")
        ax2.scatter(v["teacher"]["per_class_top1"], y, marker="|", s=120, color="black", label="teacher", zorder=3)
        ax2.set_yticks(y, [""] * len(classes))
        ax2.set_ylim(len(classes) - 0.5, -0.5)
        ax2.set_xlim(max(0.0, math.floor(min(ce_acc + ws_acc) / 10) * 10 - 10), 100)
        ax2.set_xlabel("test top-1 of the class (%), last epoch")
        ax2.set_title(f"per-class test accuracy, CE vs WSLD ({seed_note})")
        ax2.legend(loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=3, fontsize=8)
        ax2.grid(axis="x", alpha=0.3)
        fig.suptitle(f"Fashion-MNIST {titles[variant]}: where WSLD puts its weight")
        fig.tight_layout()
        path = plots / f"wsld_weights_{variant}.png"
        _save_figure(fig, path)
        plt.close(fig)
        written.append(path)

    # 4. long-tailed: per-class accuracy of every method against the training count
    if "long-tail" in results:
        v = results["long-tail"]
        classes, counts = v["classes"], v["class_counts"]
        fig, ax = plt.subplots(figsize=(10, 4.8))
        x = np.arange(len(classes))
        series = [("teacher", v["teacher"]["per_class_top1"])] + [(l, e["per_class_top1_mean"]) for l, e in v["losses"].items()]
        width = 0.8 / len(series)
        for i, (name, acc) in enumerate(series):
            ax.bar(x + (i - (len(series) - 1) / 2) * width, acc, width, color=LOSS_COLORS[name],
                   label="teacher" if name == "teacher" else LOSS_NAMES[name])
        for g, ks in v["groups"].items():
            ax.axvspan(min(ks) - 0.5, max(ks) + 0.5, color="grey", alpha=0.06 if g == "middle" else 0.0)
            ax.text((min(ks) + max(ks)) / 2, 101, g, ha="center", va="bottom", fontsize=9)
        ax.set_xticks(x, [f"{c}\n{n:,}" for c, n in zip(classes, counts)], fontsize=8)
        ax.set_ylim(0, 108)
        ax.set_ylabel("test top-1 of the class (%)")
        ax.set_xlabel("class (training images in the long-tailed split)")
        ax.set_title(f"Fashion-MNIST long-tailed (ratio 100): per-class test accuracy ({seed_note})", pad=18)
        ax.legend(loc="lower left", fontsize=8, ncol=4)
        ax.grid(axis="y", alpha=0.3)
        path = plots / "long_tail_per_class.png"
        _save_figure(fig, path)
        plt.close(fig)
        written.append(path)
    return written


# --------------------------------------------------------------------------- report


def training_span(specs: list[RunSpec]) -> float:
    """Seconds from the earliest run start to the latest run end, from the runs' own metrics."""
    starts, ends = [], []
    for sp in specs:
        recs = read_metrics(sp.run_dir)
        times = [r["time"] for r in recs if "time" in r]
        if times:
            starts.append(min(times))
            ends.append(max(times))
    return max(ends) - min(starts) if starts else 0.0


def _fmt(m: float, sd: Optional[float]) -> str:
    return f"{m:.2f} ± {sd:.2f}" if sd is not None else f"{m:.2f}"


def _params(name: str) -> int:
    from wsld.models import build_model

    return sum(p.numel() for p in build_model(name, 10, in_channels=3).parameters())


def results_table(results: dict[str, Any], variant: str) -> list[str]:
    """The reference table's shape: Teacher, Original, KD, WSLD; mean ± std over seeds + per seed."""
    v = results[variant]
    seeds = [r["seed"] for r in v["losses"]["ce"]["seeds"]]
    lines = [
        f"| Network | Method | top-1 (%) | per seed ({', '.join(str(s) for s in seeds)}) |",
        "|---|---|---|---|",
        f"| cnn_teacher ({_params('cnn_teacher') / 1000:.1f}k params) | Teacher | {v['teacher']['top1']:.2f} "
        f"(trained once) | {v['teacher']['top1']:.2f} |",
    ]
    student = f"cnn_student ({_params('cnn_student') / 1000:.1f}k params)"
    for loss, e in v["losses"].items():
        per_seed = ", ".join(f"{r['top1']:.2f}" for r in e["seeds"])
        lines.append(f"| {student} | {e['row']} | {_fmt(e['top1_mean'], e['top1_std'])} | {per_seed} |")
    return lines


def group_table(results: dict[str, Any], variant: str) -> list[str]:
    v = results[variant]
    counts, groups = v["class_counts"], v["groups"]

    def head(g: str) -> str:
        ks = groups[g]
        return f"{g} ({len(ks)} classes, {min(counts[k] for k in ks):,}-{max(counts[k] for k in ks):,} train images)"

    lines = [f"| Method | overall | {' | '.join(head(g) for g in groups)} |", "|---|---|" + "---|" * len(groups)]
    t = v["teacher"]
    lines.append(f"| Teacher | {t['top1']:.2f} | " + " | ".join(f"{t['group_top1'][g]:.2f}" for g in groups) + " |")
    for _loss, e in v["losses"].items():
        cells = [_fmt(e["group_top1"][g]["mean"], e["group_top1"][g]["std"]) for g in groups]
        lines.append(f"| {e['row']} | {_fmt(e['top1_mean'], e['top1_std'])} | " + " | ".join(cells) + " |")
    return lines


def comparison_lines(results: dict[str, Any], variant: str) -> list[str]:
    v = results[variant]
    out = []
    for other in ("ce", "kd"):
        d = v[f"wsld_minus_{other}"]
        n = len(d["per_seed"])
        spread = f" ± {d['std']:.2f}" if d["std"] is not None else ""
        out.append(
            f"WSLD − {LOSS_NAMES[other]}: {d['mean']:+.2f}{spread} points (paired by seed; per seed "
            f"{', '.join(f'{x:+.2f}' for x in d['per_seed'])}): WSLD is ahead on {d['wsld_ahead']} of {n} seed(s)."
        )
    return out


def tuning_lines(meta: dict[str, Any]) -> list[str]:
    """The learning-rate search: procedure and table (held-out top-1 per loss and rate)."""
    t = meta["tuning"]
    lrs = [f"{lr:g}" for lr in t["lrs"]]
    lines = [
        f"Before the comparison, every loss trains the student once per learning rate in {{{', '.join(lrs)}}} "
        f"(per 256 images), seed 0, {t['epochs']} epochs, on the first {t['per_class']:,} training images of each "
        f"class, and is evaluated on the next {t['per_class']:,} training images of each class (held out: never "
        "trained on; the test images are not used). Each loss then uses, for every seed and both variants, the "
        "rate with the best held-out top-1 at the last epoch. The KD/WSLD search runs use the balanced teacher.",
        "",
        "```", *meta["tune_commands"], "```", "",
        f"| loss | {' | '.join(f'lr {lr}' for lr in lrs)} | chosen |",
        "|---|" + "---|" * (len(lrs) + 1),
    ]
    for loss, v in t["chosen"].items():
        cells = [f"**{v['heldout_top1'][lr]:.2f}**" if float(lr) == v["lr"] else f"{v['heldout_top1'][lr]:.2f}" for lr in lrs]
        lines.append(f"| {LOSS_NAMES[loss]} | {' | '.join(cells)} | {v['lr']:g} |")
    return lines


def write_report(out: Path, results: dict[str, Any], meta: dict[str, Any], plots: list[Path]) -> str:
    """``report.md``; returns the short table printed at the end of the demo."""
    from wsld.checkpoint import atomic_write_text

    s = meta["settings"]
    busy = max(meta["machine"]["load_start"], meta["machine"]["load_end"]) > meta["machine"]["cpus"]
    lines = ["# wsld demo: teacher / student alone / KD / WSLD on Fashion-MNIST", ""]
    lines.append(f"Command: `{meta['command']}`" + (" (`--quick`: a pipeline check, not the comparison)" if s["quick"] else ""))
    lines.append("")
    lines.append(
        f"Machine: {meta['machine']['cpus']} CPU cores, {meta['machine']['device']}, torch {meta['machine']['torch']}; "
        f"{s['jobs']} run(s) at a time, {s['threads']} thread(s) each. Training took "
        f"{_duration(meta['training_span_s'])} from the first run's start to the last run's end (from the runs' "
        f"metrics.jsonl), {_duration(meta['runs_s'])} summed over runs; this invocation of the demo took "
        f"{_duration(meta['wall_s'])}. Load average (1 min) at the start / end of this invocation: "
        f"{meta['machine']['load_start']:.1f} / {meta['machine']['load_end']:.1f} on {meta['machine']['cpus']} cores"
        + (" (above the core count: other processes competed for the CPUs)." if busy else ".")
    )
    lines.append("")
    lines.append(
        "Numbers are the **last epoch's** top-1 on the test images (no checkpoint picked on the test set), "
        "mean ± sample standard deviation over seeds; the teacher is trained once per variant (seed 0)."
    )
    for variant, v in results.items():
        n_tr, n_val = v["train_images"], v["val_images"]
        if variant == "balanced":
            lines += ["", f"## Balanced ({n_tr:,} training images, {n_val:,} test images)", ""]
            lines += results_table(results, variant)
        else:
            lines += ["", f"## Long-tailed (imbalance ratio 100: {n_tr:,} training images, balanced {n_val:,} test images)", ""]
            lines.append("Training images per class: " + ", ".join(f"{c} {n:,}" for c, n in zip(v["classes"], v["class_counts"])) + ".")
            lines.append("Head / middle / tail = the first / middle / last third of classes by training count (3 / 4 / 3 classes); "
                         "a group's accuracy is the mean of its classes' accuracies.")
            lines.append("")
            lines += results_table(results, variant)
            lines += [""] + group_table(results, variant)
        lines.append("")
        lines += comparison_lines(results, variant)
    lines += ["", "## Plots", ""]
    for p in plots:
        lines.append(f"![{p.stem}](plots/{p.name})")
        lines.append("")
    r = meta["recipe"]
    lines += [
        "## How the numbers were made", "",
        "Data, as a user prepares ImageNet (the export writes class folders whose sorted order is the label order):", "",
        "```",
        f"# export: {meta['data_root']}/{{train,val}}/<class>/<index>.png (the test images are val)",
        *meta["data_commands"],
        "```", "",
        "Every run is `wsld train CONFIG --out RUN_DIR` with a config written to `configs/` (rerun any row by hand "
        "with the same command). One recipe for every loss; only `distill` differs:", "",
        f"- student `cnn_student`, teacher `cnn_teacher`, 3-channel 28x28 PNGs decoded from the LMDB, "
        f"normalised with Fashion-MNIST's mean/std",
        f"- epochs: {r['epochs']} (teacher: {r['teacher_epochs']}), batch {r['batch_size']}, SGD momentum 0.9 Nesterov, "
        f"lr x batch/256 with the lr per loss chosen below (teacher: 0.1), cosine schedule, weight decay 5e-4, fp32",
        "- augmentation: random 28x28 crop of the image zero-padded by 2 pixels + horizontal flip "
        "(`data.train_crop=padded`); test: the image as it is",
        "- KD: T = 4, alpha = 0.9 (`(1 - alpha) CE + alpha T^2 KL`); WSLD: T = 4, alpha = 2.25 "
        "(`CE + alpha * weighted soft term`), the authors' CIFAR-100 values",
        "- one search, the same for every loss: the learning rate (table below); every other value was fixed "
        "before the runs and is the same for every loss and seed",
        "- the teacher is its own CE run (`<variant>-teacher`), trained once per variant on that variant's training "
        "split; every KD/WSLD run loads its `last.pt` as `model.teacher_weights`",
        "- the teacher's output is computed **online** in every step, on the exact augmented batch the student sees "
        "(teacher in eval mode, BatchNorm running statistics, no gradient)",
        "- seed s fixes the student's initialisation and the data order/augmentation, the same for every loss, so "
        "differences are also given paired by seed",
        "", "## Learning rate: one search per loss, the same for every loss", "",
        *tuning_lines(meta), "", "## Runs", "",
        "| run | config | last top-1 | best top-1 (epoch) | time |", "|---|---|---|---|---|",
    ]  # fmt: skip
    for run in meta["runs"]:
        t = _duration(run["seconds"]) if run["seconds"] is not None else "earlier"
        lines.append(f"| {run['name']} | `configs/{run['name']}.yaml` | {run['top1']:.2f} | {run['best_top1']:.2f} "
                     f"({run['best_epoch']}) | {t} |")
    atomic_write_text(out / "report.md", "\n".join(lines) + "\n")

    printed = []
    for variant in results:
        printed += ["", f"Fashion-MNIST, {variant} (test top-1 %, last epoch, mean ± std over seeds)"]
        printed += results_table(results, variant)
        if variant == "long-tail":
            printed += group_table(results, variant)
        printed += comparison_lines(results, variant)
    return "\n".join(printed)


# --------------------------------------------------------------------------- command


def settings_from_args(args: argparse.Namespace) -> Settings:
    import torch

    base = dict(QUICK if args.quick else FULL)
    if args.variants:
        base["variants"] = tuple(dict.fromkeys(args.variants))
    for key in ("seeds", "epochs", "teacher_epochs"):
        value = getattr(args, key)
        if value is not None:
            base[key] = value
    if args.limit_per_class is not None:
        base["train_per_class"] = base["val_per_class"] = args.limit_per_class
        base["tune_per_class"] = max(1, min(base["tune_per_class"], args.limit_per_class // 2))
    if args.tune_epochs is not None:
        base["tune_epochs"] = args.tune_epochs
    cpus = os.cpu_count() or 1
    jobs = args.jobs if args.jobs is not None else (1 if torch.cuda.is_available() else min(2, cpus))
    threads = args.threads if args.threads is not None else max(1, cpus // max(1, jobs))
    s = Settings(**base, batch_size=args.batch_size, jobs=jobs, threads=threads, quick=args.quick, source=args.data_path)
    for key in ("seeds", "epochs", "teacher_epochs", "tune_epochs", "batch_size", "jobs", "threads"):
        if getattr(s, key) < 1:
            raise UserError(f"--{key.replace('_', '-')} must be >= 1, got {getattr(s, key)}")
    if s.train_per_class is not None and s.train_per_class < 1:
        raise UserError(f"--limit-per-class must be >= 1, got {s.train_per_class}")
    return s


def command_line(args: argparse.Namespace) -> str:
    """The demo's command as typed (the options that were given), for the report."""
    parts = ["wsld", "demo"]
    if args.quick:
        parts.append("--quick")
    for key in ("out", "seeds", "variants", "epochs", "teacher_epochs", "tune_epochs", "jobs", "threads", "batch_size",
                "limit_per_class", "data_path"):
        value = getattr(args, key)
        if value is None or (key == "batch_size" and value == 128):
            continue
        flag = "--" + key.replace("_", "-")
        parts += [flag, *map(str, value)] if isinstance(value, list) else [flag, str(value)]
    return " ".join(parts)


def _positive_int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got '{text}'") from None


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="the reference comparison (teacher / student alone / KD / WSLD) on Fashion-MNIST, with a report",
        description="Export the built-in Fashion-MNIST as an ImageNet-style photo folder, list and pack it into "
        "LMDB, train a CNN teacher once per variant, then the student with ce, kd and wsld over several seeds, "
        "balanced and long-tailed (ratio 100), all with 'wsld train' from the LMDB; writes OUT/report.md, "
        "OUT/results.json, PNG plots, and the config of every run in OUT/configs/. Running the same command again "
        "reuses finished runs and resumes unfinished ones. See docs/demo.md.",
    )
    p.add_argument("--out", default="runs/demo", metavar="DIR", help="output folder (default: %(default)s)")
    p.add_argument("--seeds", type=_positive_int, metavar="N", help=f"student seeds per loss (default {FULL['seeds']}, --quick {QUICK['seeds']})")
    p.add_argument("--quick", action="store_true",
                   help=f"pipeline check in a few minutes: balanced only, {QUICK['seeds']} seed, "
                   f"{QUICK['train_per_class']} training images per class, all test images, {QUICK['epochs']} epochs")
    p.add_argument("--variants", nargs="+", choices=list(VARIANTS), metavar="V",
                   help="balanced and/or long-tail (default: both; --quick: balanced)")
    p.add_argument("--epochs", type=_positive_int, metavar="E",
                   help=f"student epochs, every loss (default {FULL['epochs']}, --quick {QUICK['epochs']})")
    p.add_argument("--teacher-epochs", type=_positive_int, metavar="E",
                   help=f"teacher epochs (default {FULL['teacher_epochs']}, --quick {QUICK['teacher_epochs']})")
    p.add_argument("--tune-epochs", type=_positive_int, metavar="E",
                   help=f"epochs of each learning-rate search run (default {FULL['tune_epochs']}, --quick {QUICK['tune_epochs']})")
    p.add_argument("--jobs", type=_positive_int, metavar="N",
                   help="training runs at a time, each a 'wsld train' process (default: 2 on a CPU machine with 2+ "
                   "cores, 1 with CUDA; 1 runs them one by one in this process)")
    p.add_argument("--threads", type=_positive_int, metavar="T",
                   help="torch threads per run (default: CPU cores / jobs)")
    p.add_argument("--batch-size", type=_positive_int, default=128, metavar="B", help="batch size of every run (default: %(default)s)")
    p.add_argument("--limit-per-class", type=_positive_int, metavar="N",
                   help="use only the first N training and N test images of each class (for tests and smoke checks)")
    p.add_argument("--data-path", metavar="DIR", help="folder with the Fashion-MNIST IDX files (default: the system location)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def _exit_on_sigterm(signum, frame) -> None:
    raise SystemExit(128 + signum)  # unwinds through the runner, which stops its wsld train processes


def run(args: argparse.Namespace) -> int:
    """``wsld demo``; a SIGTERM (kill) unwinds like Ctrl-C, so the training processes stop with it."""
    if threading.current_thread() is not threading.main_thread():
        return _run_demo(args)
    previous = signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        return _run_demo(args)
    finally:
        signal.signal(signal.SIGTERM, previous)


def _run_demo(args: argparse.Namespace) -> int:
    import torch

    t_start = time.perf_counter()
    load_start = os.getloadavg()[0]
    s = settings_from_args(args)
    out = Path(os.path.expanduser(args.out))
    stream = sys.stderr
    progress = not args.no_progress

    def log(msg: str) -> None:
        from tqdm import tqdm

        tqdm.write(f"[demo] {msg}", file=stream)

    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create the demo folder {out}: {e.strerror or e} (choose another --out)") from None
    log(f"{out}: {s.seeds} seed(s), {', '.join(s.variants)}; {s.epochs} student epochs, {s.teacher_epochs} teacher "
        f"epochs; {s.jobs} run(s) at a time")
    data = out / "data"
    main_plan: ExportPlan = {"train": ("train", 0, s.train_per_class), "val": ("val", 0, s.val_per_class)}
    lmdb_dir, data_commands = prepare_data(data / data_folder_name(s.train_per_class, s.val_per_class), main_plan, s, log)
    n = s.tune_per_class  # tuning split: train = the first n training images per class, val = the next n
    tune_plan: ExportPlan = {"train": ("train", 0, n), "val": ("train", n, n)}
    tune_lmdb, tune_commands = prepare_data(data / f"fashion-mnist-tune-{n}", tune_plan, s, log)

    def run_phase(specs: list[RunSpec]) -> dict[str, float]:
        states = {sp.name: run_state(sp) for sp in specs}  # refuses runs of other settings before writing anything
        write_configs(specs)
        return Runner(specs, states, s, progress, log, stream).run()

    phase1, variants = plan_teachers_and_tuning(out, lmdb_dir, tune_lmdb, s)
    times = run_phase(phase1)
    lrs = select_lrs(phase1)
    log("learning rates chosen on held-out training images: "
        + ", ".join(f"{loss} {v['lr']:g}" for loss, v in lrs.items()))
    phase2 = plan_students(out, lmdb_dir, s, variants, lrs)
    times.update(run_phase(phase2))
    specs = phase1 + phase2

    from wsld.data.builtin import FASHION_MNIST_CLASSES

    results = collect(specs, variants, list(FASHION_MNIST_CLASSES))
    plots = make_plots(results, out / "plots", s.seeds)
    timings_path = out / "timings.json"
    timings = json.loads(timings_path.read_text(encoding="utf-8")) if timings_path.is_file() else {}
    timings.update({k: round(v, 1) for k, v in times.items()})
    from wsld.checkpoint import atomic_write_text

    atomic_write_text(timings_path, json.dumps(timings, indent=2))
    runs_meta = []
    for sp in specs:
        summ = json.loads((sp.run_dir / "summary.json").read_text(encoding="utf-8"))
        runs_meta.append({
            "name": sp.name, "variant": sp.variant, "loss": sp.loss, "seed": sp.seed,
            "config": str(sp.config_path), "run_dir": str(sp.run_dir), "top1": summ["last_top1"],
            "best_top1": summ["best_top1"], "best_epoch": summ["best_epoch"], "seconds": timings.get(sp.name),
        })  # fmt: skip
    meta = {
        "command": command_line(args),
        "settings": {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(s).items()},
        "recipe": {"epochs": s.epochs, "teacher_epochs": s.teacher_epochs, "batch_size": s.batch_size},
        "machine": {"cpus": os.cpu_count(), "torch": torch.__version__, "load_start": load_start,
                    "load_end": os.getloadavg()[0],
                    "device": "CUDA " + torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"},
        "data_root": str(lmdb_dir.parent), "data_commands": data_commands, "tune_commands": tune_commands,
        "tuning": {"lrs": list(STUDENT_LRS), "per_class": s.tune_per_class, "epochs": s.tune_epochs, "chosen": lrs},
        "wall_s": time.perf_counter() - t_start,
        "runs_s": sum(v for v in timings.values()),
        "training_span_s": training_span(specs),
        "runs": runs_meta,
    }  # fmt: skip
    table = write_report(out, results, meta, plots)
    atomic_write_text(out / "results.json", json.dumps({**meta, "variants": results}, indent=2))
    print(table.lstrip("\n"))
    print(f"\nreport: {out / 'report.md'}  results: {out / 'results.json'}  plots: {out / 'plots'}  "
          f"({_duration(meta['wall_s'])})")
    return 0
