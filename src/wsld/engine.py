"""The training engine: one ``train_step`` (also used by the benchmarks) and the loop around it.

Design points (see docs/engine.md):
- the teacher runs under ``torch.no_grad()``, outside the optimizer and outside DDP; its BatchNorm
  mode is ``eval`` (running statistics) or ``train`` (batch statistics, as the reference did, with
  the running statistics frozen so the teacher is the same model at the end);
- sampling is deterministic per sample (``data.sampling``), so a run killed at any step and resumed
  from its last checkpoint finishes with the same weights as an uninterrupted run;
- only rank 0 writes files; every file is written atomically.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import random
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.data import DataLoader

from wsld.checkpoint import atomic_write_text, load_checkpoint, rng_state, save_checkpoint, set_rng_state
from wsld.config import Config, config_from_dict, to_dict, to_yaml
from wsld.data import DataInfo, build_datasets
from wsld.data.datasets import collate_skip_corrupt
from wsld.data.sampling import ResumableSampler
from wsld.errors import CheckpointError, UserError
from wsld.losses.registry import DistillLoss
from wsld.models import build_model, check_model_name, load_weights

# keys that may differ between a run's saved config and the config of a resumed run: where the
# data lives, how fast it is read, how often we log or checkpoint, and speed options that do not
# change what is computed beyond float rounding (docs/engine.md, "Resume")
RESUME_SAFE_KEYS = {
    "data.data_path", "data.workers", "data.val_batch_size", "train.progress", "train.log_every",
    "model.teacher_cache", "model.compile", "model.channels_last", "checkpoint.every_steps",
}  # fmt: skip

# Test hook (docs/engine.md): WSLD_STOP_AFTER_STEPS=N makes the student run exit abruptly
# (os._exit, no cleanup, like a crash) right after this process has taken N optimizer steps and
# written any checkpoint due at that step. Used by the resume and reliability tests.
STOP_AFTER_STEPS_ENV = "WSLD_STOP_AFTER_STEPS"
STOP_EXIT_CODE = 99


class TrainingDiverged(UserError):
    """Loss became NaN/Inf with nan_policy=stop."""

    exit_code = 3


# --------------------------------------------------------------------------- runtime


@dataclass
class Runtime:
    device: torch.device
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup_runtime(device: Optional[str] = None) -> Runtime:
    """Read torchrun's environment; start the process group (NCCL on CUDA, gloo on CPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device is None:
        device = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
    return Runtime(dev, rank, world, local_rank)


def barrier(rt: Runtime) -> None:
    if rt.distributed:
        dist.barrier()


def broadcast_object(rt: Runtime, obj: Any) -> Any:
    if not rt.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def seed_everything(seed: int, deterministic: bool = False) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")


def cpu_threads(cfg: Config, rt: Runtime) -> Optional[int]:
    """Torch threads for this process (None: leave torch's default, as on CUDA)."""
    if cfg.train.threads > 0:
        return cfg.train.threads
    if rt.device.type == "cuda" or os.environ.get("OMP_NUM_THREADS"):
        return None  # CUDA, or the user set the threads for the process
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", rt.world_size))
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // max(1, local_world))


def set_cpu_threads(cfg: Config, rt: Runtime) -> None:
    n = cpu_threads(cfg, rt)
    if n is not None and n != torch.get_num_threads():
        torch.set_num_threads(n)


def amp_dtype_for(amp: str, device: torch.device) -> Optional[torch.dtype]:
    """Autocast dtype for ``train.amp``. ``auto``: bf16 on CUDA (fp16 + GradScaler on GPUs without
    bf16), off on CPU. fp16 on CPU is refused: CPU autocast is meant for bf16 and a GradScaler is
    only used on CUDA."""
    if amp == "auto":
        if device.type != "cuda":
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if amp == "fp16" and device.type != "cuda":
        raise UserError("config key 'train.amp': fp16 needs a CUDA device; on CPU use train.amp=bf16 or off")
    return {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}[amp]


def use_channels_last(cfg: Config, device: torch.device) -> bool:
    return cfg.model.channels_last if cfg.model.channels_last is not None else device.type == "cuda"


# --------------------------------------------------------------------------- the step


class BatchNormalizer:
    """uint8 NCHW batch -> normalised float on the device (loaders move uint8: 4x less traffic)."""

    def __init__(self, mean: list[float], std: list[float], device: torch.device, channels_last: bool = False):
        self.mean = torch.tensor(mean, device=device).view(1, -1, 1, 1) * 255.0
        self.inv_std = 1.0 / (torch.tensor(std, device=device).view(1, -1, 1, 1) * 255.0)
        self.device = device
        self.channels_last = channels_last

    def __call__(self, images: Tensor) -> Tensor:
        x = images.to(self.device, non_blocking=True)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return (x.float() - self.mean) * self.inv_std


def set_teacher_bn_mode(teacher: nn.Module, mode: str) -> None:
    """``eval``: running statistics. ``train``: batch statistics (reference), running stats frozen."""
    teacher.eval()
    if mode == "train":
        for m in teacher.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.train()
                m.momentum = 0.0  # use batch statistics, never move the stored ones
    for p in teacher.parameters():
        p.requires_grad_(False)


@dataclass
class StepContext:
    """Everything ``train_step`` needs besides the batch."""

    student: nn.Module
    teacher: Optional[nn.Module]
    loss_fn: Callable[[Tensor, Optional[Tensor], Tensor], tuple[Tensor, dict[str, Tensor]]]
    optimizer: torch.optim.Optimizer
    scaler: Optional[torch.amp.GradScaler] = None
    amp_dtype: Optional[torch.dtype] = None
    grad_clip: float = 0.0
    check_finite: bool = True
    teacher_logits_fn: Optional[Callable[[Tensor, Any], Tensor]] = None  # e.g. stored soft labels


def _autocast(device: torch.device, dtype: Optional[torch.dtype]):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def _all_finite(loss: Tensor) -> bool:
    """One host sync per step; under DDP every rank takes the same decision."""
    ok = torch.isfinite(loss.detach()).to(torch.int32)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(ok, op=dist.ReduceOp.MIN)
    return bool(ok.item())


def train_step(ctx: StepContext, images: Tensor, targets: Tensor, extra: Any = None) -> tuple[Optional[Tensor], dict[str, Tensor]]:
    """One optimisation step of the student. Returns (loss, parts); loss is None if it was not
    finite and the step was skipped (the caller decides what a non-finite loss means)."""
    device = images.device
    teacher_logits = None
    if ctx.teacher_logits_fn is not None:
        teacher_logits = ctx.teacher_logits_fn(images, extra)
    elif ctx.teacher is not None:
        with torch.no_grad(), _autocast(device, ctx.amp_dtype):
            teacher_logits = ctx.teacher(images)
    with _autocast(device, ctx.amp_dtype):
        student_logits = ctx.student(images)
    loss, parts = ctx.loss_fn(student_logits, teacher_logits, targets)
    if ctx.check_finite and not _all_finite(loss):
        ctx.optimizer.zero_grad(set_to_none=True)
        return None, parts
    ctx.optimizer.zero_grad(set_to_none=True)
    if ctx.scaler is not None:
        ctx.scaler.scale(loss).backward()
        if ctx.grad_clip > 0:
            ctx.scaler.unscale_(ctx.optimizer)
            nn.utils.clip_grad_norm_(ctx.student.parameters(), ctx.grad_clip)
        ctx.scaler.step(ctx.optimizer)
        ctx.scaler.update()
    else:
        loss.backward()
        if ctx.grad_clip > 0:
            nn.utils.clip_grad_norm_(ctx.student.parameters(), ctx.grad_clip)
        ctx.optimizer.step()
    return loss.detach(), parts


# --------------------------------------------------------------------------- optimiser & schedule


def build_optimizer(model: nn.Module, cfg: Config, lr: float) -> torch.optim.Optimizer:
    t = cfg.train
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if (p.ndim <= 1 and not t.wd_norm_bias) else decay).append(p)
    groups = [{"params": decay, "weight_decay": t.weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    if t.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=t.momentum, nesterov=t.nesterov and t.momentum > 0)
    return torch.optim.AdamW(groups, lr=lr)


def lr_factor(cfg: Config, epoch_float: float) -> float:
    """Multiplier of the base lr at a (fractional) epoch: linear warmup, then the schedule.

    step/multistep change at whole epochs, as the reference did; cosine decays per step.
    """
    t = cfg.train
    if t.warmup_epochs > 0 and epoch_float < t.warmup_epochs:
        return (epoch_float + 1e-12) / t.warmup_epochs
    if t.schedule == "cosine":
        span = max(1e-12, t.epochs - t.warmup_epochs)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (epoch_float - t.warmup_epochs) / span)))
    if t.schedule == "step":
        return t.gamma ** (int(epoch_float) // t.step_size)
    if t.schedule == "multistep":
        return t.gamma ** sum(1 for m in t.milestones if int(epoch_float) >= m)
    return 1.0


def effective_lr(cfg: Config) -> float:
    """``train.lr`` is for a global batch of ``train.base_batch_size``; it scales linearly."""
    return cfg.train.lr * cfg.data.batch_size / cfg.train.base_batch_size


# --------------------------------------------------------------------------- evaluation

# test hook: WSLD_TEST_SLOW_EVAL=<seconds> sleeps before each eval batch, so a test can kill a run
# during evaluation (tests/test_reliability_resume.py)
SLOW_EVAL_ENV = "WSLD_TEST_SLOW_EVAL"


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: DataLoader,
    normalize: BatchNormalizer,
    num_classes: int,
    rt: Runtime,
    amp_dtype: Optional[torch.dtype] = None,
    progress: bool = False,
    desc: str = "eval",
) -> dict[str, Any]:
    """Top-1/top-5 (%) and per-class accuracy, summed over all ranks."""
    from tqdm import tqdm

    was_training = model.training
    model.eval()
    dev = normalize.device
    correct1 = torch.zeros(num_classes, device=dev, dtype=torch.float64)
    correct5 = torch.zeros((), device=dev, dtype=torch.float64)
    total = torch.zeros(num_classes, device=dev, dtype=torch.float64)
    loss_sum = torch.zeros((), device=dev, dtype=torch.float64)
    pause_s = float(os.environ.get(SLOW_EVAL_ENV) or 0)
    for images, targets, _bad in tqdm(loader, desc=desc, leave=False, disable=not progress, mininterval=1.0):
        if pause_s > 0:
            time.sleep(pause_s)
        x = normalize(images)
        y = targets.to(dev, non_blocking=True)
        with _autocast(dev, amp_dtype):
            logits = model(x)
        logits = logits.float()
        loss_sum += torch.nn.functional.cross_entropy(logits, y, reduction="sum").double()
        k = min(5, logits.shape[1])
        top = logits.topk(k, dim=1).indices
        hit1 = (top[:, 0] == y).double()
        correct1.index_add_(0, y, hit1)
        correct5 += (top == y[:, None]).any(dim=1).double().sum()
        total.index_add_(0, y, torch.ones_like(hit1))
    if rt.distributed:
        for t in (correct1, correct5, total, loss_sum):
            dist.all_reduce(t)
    model.train(was_training)
    n = float(total.sum().item())
    per_class = (correct1 / total.clamp_min(1)).cpu().tolist()
    return {
        "top1": 100.0 * float(correct1.sum().item()) / max(n, 1.0),
        "top5": 100.0 * float(correct5.item()) / max(n, 1.0),
        "loss": float(loss_sum.item()) / max(n, 1.0),
        "per_class_top1": [100.0 * v for v in per_class],
        "count": int(n),
    }


# --------------------------------------------------------------------------- run directory


class MetricsLog:
    """JSON-lines metrics (rank 0 only) plus TensorBoard scalars; truncatable on resume."""

    def __init__(self, run_dir: Path, enabled: bool, purge_step: Optional[int] = None, keep_lines: Optional[int] = None):
        self.enabled = enabled
        self.path = run_dir / "metrics.jsonl"
        self.lines = 0
        self.tb = None
        if not enabled:
            return
        if keep_lines is not None and self.path.exists():
            kept = self.path.read_text(encoding="utf-8").splitlines()[:keep_lines]
            atomic_write_text(self.path, "".join(line + "\n" for line in kept))
        self.lines = len(self.path.read_text(encoding="utf-8").splitlines()) if self.path.exists() else 0
        self._f = open(self.path, "a", encoding="utf-8")
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(run_dir / "tb"), purge_step=purge_step)
        except Exception as e:  # tensorboard missing or broken: keep the JSON log
            print(f"wsld: TensorBoard logging off ({e})", file=sys.stderr)

    def write(self, record: dict[str, Any], step: Optional[int] = None) -> None:
        if not self.enabled:
            return
        record = {"time": round(time.time(), 3), **record}
        self._f.write(json.dumps(record) + "\n")
        self._f.flush()
        os.fsync(self._f.fileno())
        self.lines += 1
        if self.tb is not None and step is not None:
            kind = record.get("kind", "x")
            for k, v in record.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in ("epoch", "step", "global_step", "time"):
                    self.tb.add_scalar(f"{kind}/{k}", v, step)

    def close(self) -> None:
        if self.enabled:
            self._f.close()
            if self.tb is not None:
                self.tb.close()


def write_probe(run_dir: Path, nbytes: int) -> None:
    """Fail before training if the run directory cannot hold a checkpoint (unwritable, disk full)."""
    probe = run_dir / ".write_probe"
    try:
        with open(probe, "wb") as f:
            chunk = b"\0" * (1 << 20)
            left = nbytes
            while left > 0:
                f.write(chunk[: min(left, len(chunk))])
                left -= len(chunk)
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        raise UserError(f"run directory {run_dir} cannot hold a {nbytes / 2**20:.0f} MiB checkpoint ({e.strerror or e}): free space or choose another --out") from None
    finally:
        try:
            probe.unlink()
        except OSError:
            pass


def early_write_probe(run_dir: Path, nbytes: int = 1 << 20) -> None:
    """Fail in the first second, before data, teacher training or the run directory exist, when
    ``run_dir`` cannot be created or written: a path through a regular file, a read-only file
    system, a full disk, no permission. Leaves nothing behind (an unnamed temp file in the nearest
    existing folder). ``write_probe`` checks the full checkpoint size once the model is built."""
    folder = Path(os.path.abspath(run_dir))
    while not os.path.lexists(folder) and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        raise UserError(f"cannot create run directory {run_dir}: {folder} is not a folder (choose another --out)")
    try:
        import tempfile

        with tempfile.TemporaryFile(dir=folder) as f:
            f.write(b"\0" * nbytes)
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        raise UserError(f"run directory {run_dir} is not writable ({e.strerror or e}): free space or choose another --out") from None


def default_run_dir(cfg: Config) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{stamp}-{cfg.data.dataset}-{cfg.distill.loss}-{cfg.model.student}"


def config_diff(a: dict, b: dict, prefix: str = "") -> list[str]:
    keys = []
    for k in sorted(set(a) | set(b)):
        va, vb = a.get(k), b.get(k)
        if isinstance(va, dict) and isinstance(vb, dict):
            keys += config_diff(va, vb, f"{prefix}{k}.")
        elif va != vb:
            keys.append(f"{prefix}{k}")
    return keys


# --------------------------------------------------------------------------- teacher


def teacher_training_config(cfg: Config) -> Config:
    """The config that trains the teacher with CE on the same data (same engine, same loader).

    Only what shapes the teacher is taken from ``cfg`` (data, teacher name, ``teacher_train``, the
    optimiser family, seed, speed options); student-only keys are reset to their defaults, so
    changing ``distill.T`` or the student neither retrains nor invalidates a cached teacher.
    """
    tt = cfg.teacher_train
    src = to_dict(cfg)
    d = to_dict(Config())
    d["data"] = src["data"]
    d["checkpoint"] = src["checkpoint"]
    d["teacher_train"] = src["teacher_train"]
    for k in ("sync_bn", "channels_last", "compile", "teacher_cache"):
        d["model"][k] = src["model"][k]
    d["model"].update(student=cfg.model.teacher, student_weights=None, teacher_weights=None, replace_head=False)
    d["distill"].update(loss="ce")
    for k in ("base_batch_size", "optimizer", "momentum", "nesterov", "wd_norm_bias", "step_size", "milestones",
              "gamma", "grad_clip", "amp", "seed", "deterministic", "nan_policy", "log_every", "progress"):  # fmt: skip
        d["train"][k] = src["train"][k]
    d["train"].update(epochs=tt.epochs, lr=tt.lr, weight_decay=tt.weight_decay, schedule=tt.schedule, ema_decay=0.0, warmup_epochs=0.0)
    return config_from_dict(d)


def architecture_fingerprint(name: str) -> list:
    """Parameter names and shapes of model ``name`` (built on the meta device: no memory, no
    init cost), so a cached teacher is not reused after the architecture's code changed."""
    family = check_model_name(name, "model.teacher")
    with torch.device("meta"):
        model = build_model(name, 1, in_channels=1 if family == "local" else 3)
    return [[k, list(v.shape)] for k, v in model.state_dict().items()]


def teacher_cache_key(cfg: Config) -> str:
    """Hash of everything that changes the trained teacher: its training config (minus
    resume-safe keys) and its architecture."""
    d = to_dict(teacher_training_config(cfg))
    for dotted in RESUME_SAFE_KEYS:
        section, key = dotted.split(".")
        d[section].pop(key, None)
    d["architecture"] = architecture_fingerprint(cfg.model.teacher)
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:12]


def ensure_teacher(cfg: Config, rt: Runtime, log: Callable[[str], None]) -> str:
    """Path of the teacher's weights: given, or trained once and cached (an interrupted teacher
    run resumes from its own checkpoint next time)."""
    if cfg.model.teacher_weights:
        return cfg.model.teacher_weights
    cache = Path(os.path.expanduser(cfg.model.teacher_cache)) / f"{cfg.data.dataset}-{cfg.model.teacher}-{teacher_cache_key(cfg)}"
    weights = cache / "teacher.safetensors"
    if weights.is_file():
        log(f"teacher: reusing {weights}")
        return str(weights)
    tcfg = teacher_training_config(cfg)
    run = cache / "run"
    log(f"teacher: no model.teacher_weights given, training {cfg.model.teacher} with CE for {tcfg.train.epochs} epochs (cached in {cache})")
    if rt.is_main:
        cache.mkdir(parents=True, exist_ok=True)
    barrier(rt)
    resume = (run / "last.pt").is_file()
    Trainer(tcfg, run, rt, resume=resume, role="teacher").fit()
    if rt.is_main:
        from safetensors.torch import save_file

        state = load_checkpoint(run / "last.pt")["student"]
        tmp = cache / ".teacher.safetensors.tmp"
        save_file({k: v.contiguous() for k, v in state.items()}, str(tmp))
        os.replace(tmp, weights)
    barrier(rt)
    return str(weights)


# --------------------------------------------------------------------------- the loop


def make_loader(
    dataset, sampler, batch_size: int, *, workers: int, device: torch.device, drop_last: bool, seed: int = 0,
    collate_fn: Optional[Callable] = None,
) -> DataLoader:
    """A DataLoader over ``sampler`` that moves uint8 batches.

    It gets its own generator: creating an iterator then draws its worker base seed from that
    generator instead of from torch's global RNG, so evaluation or a resume does not shift the
    global random stream that dropout and friends use (exact resume needs that).
    """
    return DataLoader(
        dataset, batch_size=batch_size, sampler=sampler, num_workers=workers, collate_fn=collate_fn or collate_skip_corrupt,
        pin_memory=device.type == "cuda", drop_last=drop_last, persistent_workers=False,
        prefetch_factor=4 if workers > 0 else None, generator=torch.Generator().manual_seed(seed),
    )  # fmt: skip


class EpochStats:
    """Running sums of one epoch: the loss parts since the last metrics line and the per-class
    WSLD weights. Saved in mid-epoch checkpoints, so a resumed run logs the same numbers."""

    def __init__(self, num_classes: int, device: torch.device):
        self.sums = torch.zeros(4, device=device, dtype=torch.float64)  # loss, hard, soft, weight_mean
        self.n = 0
        self.class_w_sum = torch.zeros(num_classes, device=device, dtype=torch.float64)
        self.class_n = torch.zeros(num_classes, device=device, dtype=torch.float64)
        self.lr = 0.0
        self.reset_window()

    def reset_window(self) -> None:
        self.sums.zero_()
        self.n = 0
        self.imgs = 0
        self.wait = 0.0
        self.t0 = time.perf_counter()

    def add(self, loss: Tensor, parts: dict[str, Tensor], y: Tensor) -> None:
        self.sums += torch.stack([loss.double(), parts["hard"].double(), parts["soft"].double(), parts["weight_mean"].double()])
        self.n += 1
        sw = parts.get("sample_weight")
        if sw is not None:
            self.class_w_sum.index_add_(0, y, sw.double())
            self.class_n.index_add_(0, y, torch.ones_like(sw, dtype=torch.float64))

    def class_weights(self, rt: Runtime) -> Optional[list[float]]:
        """Mean WSLD weight per class over the epoch (all ranks), None for losses without weights."""
        w, n = self.class_w_sum, self.class_n
        if rt.distributed:
            w, n = w.clone(), n.clone()
            dist.all_reduce(w)
            dist.all_reduce(n)
        if n.sum() <= 0:
            return None
        return (w / n.clamp_min(1)).cpu().tolist()

    def state(self) -> dict[str, Any]:
        return {"sums": self.sums.cpu(), "n": self.n, "class_w_sum": self.class_w_sum.cpu(), "class_n": self.class_n.cpu()}

    def load(self, st: dict[str, Any]) -> None:
        self.sums.copy_(st["sums"])
        self.n = int(st["n"])
        self.class_w_sum.copy_(st["class_w_sum"])
        self.class_n.copy_(st["class_n"])


class Trainer:
    """Builds everything from a Config, then ``fit()`` trains and evaluates the student."""

    def __init__(self, cfg: Config, run_dir: Path | str, rt: Runtime, *, resume: bool = False, role: str = "student"):
        self.cfg, self.rt, self.role = cfg, rt, role
        self.run_dir = Path(run_dir)
        self.resume = resume
        self.log_lines: list[str] = []

    # -- helpers
    def say(self, msg: str) -> None:
        if self.rt.is_main:
            print(f"[wsld] {msg}", file=sys.stderr, flush=True)

    def _loader(self, dataset, sampler, batch_size: int, drop_last: bool, collate_fn: Optional[Callable] = None) -> DataLoader:
        return make_loader(
            dataset, sampler, batch_size, workers=self.cfg.data.workers, device=self.rt.device, drop_last=drop_last,
            seed=self.cfg.train.seed, collate_fn=collate_fn,
        )  # fmt: skip

    def setup(self) -> None:
        cfg, rt = self.cfg, self.rt
        if cfg.data.batch_size % rt.world_size:
            raise UserError(
                f"config key 'data.batch_size': global batch {cfg.data.batch_size} is not divisible by the "
                f"{rt.world_size} processes (give a multiple of {rt.world_size})"
            )
        # cheap checks first: a typo must not cost a teacher training or a data scan
        check_model_name(cfg.model.student, "model.student")
        if cfg.distill.loss != "ce" and not cfg.distill.soft_labels:
            check_model_name(cfg.model.teacher, "model.teacher")
        self.amp_dtype = amp_dtype_for(cfg.train.amp, rt.device)
        if cfg.model.sync_bn and rt.distributed and rt.device.type != "cuda":
            raise UserError("config key 'model.sync_bn': SyncBatchNorm needs CUDA devices; set model.sync_bn=false on CPU")
        set_cpu_threads(cfg, rt)
        seed_everything(cfg.train.seed, cfg.train.deterministic)
        self.train_ds, self.val_ds, self.info = build_datasets(cfg.data, seed=cfg.train.seed)
        info: DataInfo = self.info
        self.per_rank_batch = cfg.data.batch_size // rt.world_size
        if len(self.train_ds) < cfg.data.batch_size:
            raise UserError(
                f"config key 'data.batch_size': {cfg.data.batch_size} is larger than the training split ({len(self.train_ds)} images)"
            )
        # models
        self.loss = DistillLoss(cfg.distill.loss, cfg.distill.T, cfg.distill.alpha, cfg.distill.label_smoothing)
        self.teacher = None
        teacher_weights = None
        if self.loss.needs_teacher and not cfg.distill.soft_labels:
            teacher_weights = ensure_teacher(cfg, rt, self.say)
            self.teacher = build_model(
                cfg.model.teacher, info.num_classes, in_channels=info.in_channels, weights=teacher_weights,
                replace_head_if_needed=False, role="teacher",
            )  # fmt: skip
        torch.manual_seed(cfg.train.seed)  # student init independent of what ran before
        self.student = build_model(
            cfg.model.student, info.num_classes, in_channels=info.in_channels, weights=cfg.model.student_weights,
            replace_head_if_needed=cfg.model.replace_head, role="student",
        )  # fmt: skip
        dev = rt.device
        self.channels_last = use_channels_last(cfg, dev)
        mf = torch.channels_last if self.channels_last else torch.contiguous_format
        self.student.to(dev, memory_format=mf)
        if cfg.model.sync_bn and rt.distributed:
            self.student = nn.SyncBatchNorm.convert_sync_batchnorm(self.student)
        if self.teacher is not None:
            self.teacher.to(dev, memory_format=mf)
            set_teacher_bn_mode(self.teacher, cfg.model.teacher_bn_mode)
        self.scaler = torch.amp.GradScaler("cuda") if self.amp_dtype == torch.float16 else None  # fp16 is CUDA-only
        self.base_lr = effective_lr(cfg)
        self.optimizer = build_optimizer(self.student, cfg, self.base_lr)
        for g in self.optimizer.param_groups:
            g["initial_lr"] = self.base_lr
        self.ema = None
        if cfg.train.ema_decay > 0:
            from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

            self.ema = AveragedModel(self.student, multi_avg_fn=get_ema_multi_avg_fn(cfg.train.ema_decay), use_buffers=True)
        self.model = self.student
        if rt.distributed:
            self.model = nn.parallel.DistributedDataParallel(
                self.student, device_ids=[dev.index] if dev.type == "cuda" else None
            )
        run_student = self.model
        run_teacher = self.teacher
        if cfg.model.compile:
            run_student = torch.compile(self.model)
            if self.teacher is not None:
                run_teacher = torch.compile(self.teacher)
        teacher_logits_fn = None
        if cfg.distill.soft_labels:
            from wsld.soft_labels import stored_teacher_logits_fn  # type: ignore[import-not-found]

            teacher_logits_fn = stored_teacher_logits_fn(cfg, info, dev)
        self.ctx = StepContext(
            student=run_student, teacher=run_teacher, loss_fn=self.loss, optimizer=self.optimizer, scaler=self.scaler,
            amp_dtype=self.amp_dtype, grad_clip=cfg.train.grad_clip, teacher_logits_fn=teacher_logits_fn,
        )  # fmt: skip
        self.normalize = BatchNormalizer(info.mean, info.std, dev, self.channels_last)
        # data
        self.train_sampler = ResumableSampler(
            len(self.train_ds), batch_size=self.per_rank_batch, seed=cfg.train.seed, shuffle=True,
            rank=rt.rank, world_size=rt.world_size, pad=True, with_seeds=True,
        )  # fmt: skip
        self.steps_per_epoch = self.train_sampler.batches_per_epoch(drop_last=True)
        val_bs = (cfg.data.val_batch_size or cfg.data.batch_size) // rt.world_size or 1
        val_sampler = ResumableSampler(
            len(self.val_ds), batch_size=val_bs, shuffle=False, rank=rt.rank, world_size=rt.world_size, pad=False, with_seeds=False
        )
        self.val_loader = self._loader(self.val_ds, val_sampler, val_bs, drop_last=False)
        train_collate = None
        if cfg.distill.soft_labels:  # replay the stored crops; batches carry their records as a 4th item
            from wsld.soft_labels import replay_training_data

            self.train_ds, self.train_sampler, train_collate = replay_training_data(cfg, self.train_ds, self.train_sampler)
        self.train_loader = self._loader(self.train_ds, self.train_sampler, self.per_rank_batch, drop_last=True, collate_fn=train_collate)
        self.teacher_weights = teacher_weights

    def _state(self, epoch: int, step_in_epoch: int, global_step: int, stats: Optional["EpochStats"] = None) -> dict[str, Any]:
        # per-rank parts (RNG states, running sums), gathered to rank 0, which writes the file
        mine = (rng_state(), stats.state() if stats is not None else None)
        per_rank = [mine]
        if self.rt.distributed:
            per_rank = [None] * self.rt.world_size
            dist.all_gather_object(per_rank, mine)
        rngs = [r for r, _ in per_rank]
        return {
            "format": "wsld-checkpoint-1",
            "student": {k: v.detach().cpu() for k, v in self.student.state_dict().items()},
            "student_arch": self.cfg.model.student,
            "num_classes": self.info.num_classes,
            "classes": list(self.info.classes),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.sched.state_dict() if self.sched is not None else None,
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "ema": {k: v.detach().cpu() for k, v in self.ema.module.state_dict().items()} if self.ema is not None else None,
            "ema_n_averaged": int(self.ema.n_averaged.item()) if self.ema is not None else 0,
            "epoch": epoch,
            "step_in_epoch": step_in_epoch,
            "global_step": global_step,
            "epoch_stats": [st for _, st in per_rank] if stats is not None else None,
            "best_top1": self.best_top1,
            "best_epoch": self.best_epoch,
            "teacher_eval": self.teacher_eval,
            "skipped_steps": self.skipped_steps,
            "corrupt_count": self.corrupt_count,
            "metrics_lines": self.metrics.lines,
            "world_size": self.rt.world_size,
            "rng": rngs,
            "config": to_dict(self.cfg),
        }

    def _save(self, names: tuple[str, ...], epoch: int, step_in_epoch: int, global_step: int, stats: Optional["EpochStats"] = None) -> None:
        """Write the same state under each name, in order (collective: every rank calls it)."""
        state = self._state(epoch, step_in_epoch, global_step, stats)
        if self.rt.is_main:
            for name in names:
                save_checkpoint(state, self.run_dir / name)

    def _restore(self) -> tuple[int, int, int, int, Optional[dict]]:
        path = self.run_dir / "last.pt"
        ck = load_checkpoint(path)
        saved = ck.get("config", {})
        diff = [k for k in config_diff(saved, to_dict(self.cfg)) if k not in RESUME_SAFE_KEYS]
        if diff:
            raise UserError(f"cannot resume {self.run_dir}: its checkpoint was trained with other values of {', '.join(diff)} (start a new run instead)")
        load_weights(self.student, ck["student"], str(path), self.cfg.model.student)
        try:
            self.optimizer.load_state_dict(ck["optimizer"])
        except (ValueError, KeyError) as e:
            raise CheckpointError(f"{path}: optimizer state does not fit this run ({e})") from None
        if self.scaler is not None and ck.get("scaler"):
            self.scaler.load_state_dict(ck["scaler"])
        if self.ema is not None and ck.get("ema") is not None:
            self.ema.module.load_state_dict(ck["ema"])
            self.ema.n_averaged.fill_(ck.get("ema_n_averaged", 0))
        self.best_top1, self.best_epoch = ck["best_top1"], ck["best_epoch"]
        self.teacher_eval = ck.get("teacher_eval")
        self.skipped_steps = ck.get("skipped_steps", 0)
        self.corrupt_count = ck.get("corrupt_count", 0)
        rngs = ck.get("rng") or []
        if rngs:
            set_rng_state(rngs[self.rt.rank] if self.rt.rank < len(rngs) else rngs[0])
        if ck.get("world_size", 1) != self.rt.world_size:
            self.say(f"resuming a {ck.get('world_size', 1)}-process run with {self.rt.world_size} processes: same global batches, equal to float rounding only")
        stats = ck.get("epoch_stats")
        if stats and len(stats) != self.rt.world_size:
            stats = None  # other world size: the partial epoch's running sums start over
        return ck["epoch"], ck["step_in_epoch"], ck["global_step"], int(ck.get("metrics_lines") or 0), stats[self.rt.rank] if stats else None

    def _estimated_checkpoint_bytes(self) -> int:
        n = sum(p.numel() * p.element_size() for p in self.student.parameters())
        return int(n * (3 + (1 if self.ema is not None else 0))) + (1 << 20)

    def _evaluate_all(self, progress: bool) -> tuple[dict, Optional[dict]]:
        C = self.info.num_classes
        res = evaluate(self.student, self.val_loader, self.normalize, C, self.rt, self.amp_dtype, progress, "eval")
        ema = None
        if self.ema is not None:
            ema = evaluate(self.ema.module, self.val_loader, self.normalize, C, self.rt, self.amp_dtype, progress, "eval ema")
        return res, ema

    def fit(self) -> dict[str, Any]:
        from tqdm import tqdm

        cfg, rt = self.cfg, self.rt
        if rt.is_main:
            early_write_probe(self.run_dir)  # before any teacher training or data work
        self.setup()
        self.sched = None
        self.best_top1, self.best_epoch = -1.0, -1
        self.teacher_eval: Optional[dict] = None
        self.skipped_steps = 0
        self.corrupt_count = 0
        start_epoch, start_step, global_step, metrics_lines = 0, 0, 0, 0
        saved_stats: Optional[dict] = None
        if self.resume and not (self.run_dir / "last.pt").is_file():
            self.say(f"{self.run_dir} holds no checkpoint yet: starting it from the beginning")
            self.resume = False
        if self.resume:
            start_epoch, start_step, global_step, metrics_lines, saved_stats = self._restore()
        # everything validated: now the run directory may be created
        if rt.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            write_probe(self.run_dir, self._estimated_checkpoint_bytes())
            atomic_write_text(self.run_dir / "config.yaml", to_yaml(cfg))
        barrier(rt)
        # a fresh run empties metrics.jsonl and TensorBoard; a resumed one drops what came after its checkpoint
        self.metrics = MetricsLog(self.run_dir, rt.is_main, purge_step=global_step + 1 if self.resume else 0, keep_lines=metrics_lines)
        progress = cfg.train.progress and rt.is_main
        self.say(
            f"{self.role}: {cfg.model.student} on {cfg.data.dataset} ({len(self.train_ds)} train / {len(self.val_ds)} val, "
            f"{self.info.num_classes} classes), loss={cfg.distill.loss}, device={rt.device}, world={rt.world_size}, "
            f"amp={self.amp_dtype}, channels_last={self.channels_last}"
            + (f", teacher={cfg.model.teacher} ({self.teacher_weights}), teacher_bn_mode={cfg.model.teacher_bn_mode}" if self.teacher is not None else "")
            + (f", teacher outputs stored in {cfg.distill.soft_labels} (no teacher model)" if cfg.distill.soft_labels else "")
        )
        if not self.resume:
            self.metrics.write({
                "kind": "start", "role": self.role, "loss": cfg.distill.loss, "student": cfg.model.student,
                "teacher": cfg.model.teacher if self.teacher is not None else None,
                "teacher_weights": self.teacher_weights,
                "teacher_bn_mode": cfg.model.teacher_bn_mode if self.teacher is not None else None,
                "world_size": rt.world_size, "lr": self.base_lr, "steps_per_epoch": self.steps_per_epoch,
                "amp": str(self.amp_dtype), "channels_last": self.channels_last, "global_step": 0,
            })  # fmt: skip
        else:
            self.say(f"resuming {self.run_dir} at epoch {start_epoch + 1}, step {start_step} (global step {global_step})")
            self.metrics.write({"kind": "resume", "epoch": start_epoch + 1, "step": start_step, "global_step": global_step, "world_size": rt.world_size})
        if self.teacher is not None and self.teacher_eval is None:
            self.teacher_eval = evaluate(self.teacher, self.val_loader, self.normalize, self.info.num_classes, rt, self.amp_dtype, progress, "teacher eval")
            set_teacher_bn_mode(self.teacher, cfg.model.teacher_bn_mode)
            self.say(f"teacher top-1 {self.teacher_eval['top1']:.2f}  top-5 {self.teacher_eval['top5']:.2f}")
            self.metrics.write({"kind": "teacher_eval", "global_step": global_step, **self.teacher_eval}, step=0)

        warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step\\(\\)` before")
        # the schedule is a pure function of the global step: restoring the step restores the lr
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: lr_factor(cfg, s / self.steps_per_epoch))
        self.sched.last_epoch = global_step - 1
        self.sched.step()  # lr for global_step
        self.student.train()
        C = self.info.num_classes
        last_eval: Optional[dict] = None
        last_ema_eval: Optional[dict] = None
        stop_after = int(os.environ.get(STOP_AFTER_STEPS_ENV) or 0) if self.role == "student" else 0
        steps_here = 0
        for epoch in range(start_epoch, cfg.train.epochs):
            first = start_step if epoch == start_epoch else 0
            self.train_sampler.set_epoch(epoch, first)
            stats = EpochStats(C, rt.device)
            if epoch == start_epoch and saved_stats is not None:
                stats.load(saved_stats)
            bar = tqdm(total=self.steps_per_epoch, initial=first, desc=f"{self.role} epoch {epoch + 1}/{cfg.train.epochs}",
                       disable=not progress, mininterval=1.0, leave=False, dynamic_ncols=True)  # fmt: skip
            t_wait = time.perf_counter()
            step = first
            for images, targets, bad, *extra in self.train_loader:
                stats.wait += time.perf_counter() - t_wait
                if bad:
                    self._handle_corrupt(bad, epoch, step)
                lr_used = self.optimizer.param_groups[0]["lr"]
                if self._batch_is_empty(images):  # every image of the batch was corrupt (on some rank)
                    pass
                else:
                    x = self.normalize(images)
                    y = targets.to(rt.device, non_blocking=True)
                    loss, parts = train_step(self.ctx, x, y, extra[0] if extra else None)
                    if loss is None:
                        self._non_finite(epoch, step, global_step)
                    else:
                        if self.ema is not None:
                            self.ema.update_parameters(self.student)
                        stats.add(loss, parts, y)
                step += 1
                global_step += 1
                steps_here += 1
                self.sched.step()
                stats.imgs += images.shape[0] * rt.world_size
                stats.lr = lr_used
                bar.update(1)
                if cfg.train.log_every and global_step % cfg.train.log_every == 0 and stats.n:
                    rec = self._train_record(stats, epoch, step, global_step)
                    bar.set_postfix(loss=f"{rec['loss']:.3f}", lr=f"{rec['lr']:.3g}")
                if cfg.checkpoint.every_steps and global_step % cfg.checkpoint.every_steps == 0 and step < self.steps_per_epoch:
                    self._save(("last.pt",), epoch, step, global_step, stats)
                if stop_after and steps_here >= stop_after:
                    self._simulated_crash(global_step)
                t_wait = time.perf_counter()
            bar.close()
            if stats.n:
                self._train_record(stats, epoch, step, global_step)
            class_w = stats.class_weights(rt)
            if class_w is not None:
                self.metrics.write({"kind": "class_weights", "epoch": epoch + 1, "global_step": global_step, "mean_weight": class_w})
            is_last = epoch + 1 == cfg.train.epochs
            names: tuple[str, ...] = ("last.pt",)
            if (epoch + 1) % cfg.train.eval_every == 0 or is_last:
                last_eval, last_ema_eval = self._evaluate_all(progress)
                rec = {"kind": "eval", "epoch": epoch + 1, "global_step": global_step, **last_eval}
                if last_ema_eval is not None:
                    rec.update({"ema_top1": last_ema_eval["top1"], "ema_top5": last_ema_eval["top5"]})
                self.metrics.write(rec, step=global_step)
                if last_eval["top1"] > self.best_top1:
                    self.best_top1, self.best_epoch = last_eval["top1"], epoch + 1
                    # best.pt before last.pt: a crash in between redoes this epoch and rewrites both
                    names = ("best.pt", "last.pt")
                self.say(
                    f"{self.role} epoch {epoch + 1}/{cfg.train.epochs}: top-1 {last_eval['top1']:.2f} top-5 {last_eval['top5']:.2f}"
                    + (f" (EMA {last_ema_eval['top1']:.2f})" if last_ema_eval else "")
                    + f"  best {self.best_top1:.2f} @ epoch {self.best_epoch}"
                )
            self._save(names, epoch + 1, 0, global_step)
        if last_eval is None:  # resumed after the final epoch had finished
            last_eval, last_ema_eval = self._evaluate_all(progress)
        summary = {
            "role": self.role,
            "loss": cfg.distill.loss,
            "student": cfg.model.student,
            "teacher": cfg.model.teacher if self.teacher is not None else None,
            "teacher_bn_mode": cfg.model.teacher_bn_mode if self.teacher is not None else None,
            "soft_labels": cfg.distill.soft_labels,
            "epochs": cfg.train.epochs,
            "last_top1": last_eval["top1"],
            "last_top5": last_eval["top5"],
            "last_per_class_top1": last_eval["per_class_top1"],
            "last_checkpoint": "last.pt",
            "best_top1": self.best_top1,
            "best_epoch": self.best_epoch,
            "best_checkpoint": "best.pt",
            "ema_last_top1": last_ema_eval["top1"] if last_ema_eval else None,
            "ema_last_top5": last_ema_eval["top5"] if last_ema_eval else None,
            "teacher_top1": self.teacher_eval["top1"] if self.teacher_eval else None,
            "teacher_top5": self.teacher_eval["top5"] if self.teacher_eval else None,
            "teacher_per_class_top1": self.teacher_eval["per_class_top1"] if self.teacher_eval else None,
            "skipped_steps": self.skipped_steps,
            "corrupt_images": self.corrupt_count,
            "global_step": global_step,
            "world_size": rt.world_size,
            "run_dir": str(self.run_dir),
        }
        self.metrics.write({"kind": "summary", **summary})
        self.metrics.close()
        if rt.is_main:
            atomic_write_text(self.run_dir / "summary.json", json.dumps(summary, indent=2))
        barrier(rt)
        return summary

    def _batch_is_empty(self, images: Tensor) -> bool:
        """Under DDP all ranks must skip together, or the others would wait in backward forever."""
        n = images.shape[0]
        if not self.rt.distributed or self.cfg.data.format == "builtin":  # built-in samples never fail
            return n == 0
        t = torch.tensor([n], device=self.rt.device, dtype=torch.int64)
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        return int(t.item()) == 0

    def _simulated_crash(self, global_step: int) -> None:
        """The WSLD_STOP_AFTER_STEPS test hook: leave like a crash (no summary, no cleanup).

        Under DDP the ranks first meet at a barrier, so rank 0 has finished writing the checkpoint
        due at this step and the hook always stops the run at the same point."""
        self.say(f"{STOP_AFTER_STEPS_ENV}: stopping abruptly after global step {global_step} (test hook)")
        barrier(self.rt)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(STOP_EXIT_CODE)

    def _train_record(self, stats: "EpochStats", epoch: int, step: int, global_step: int) -> dict:
        sums = stats.sums
        if self.rt.distributed:
            sums = sums.clone()
            dist.all_reduce(sums)
            sums /= self.rt.world_size
        vals = (sums / stats.n).tolist()
        dt = max(1e-9, time.perf_counter() - stats.t0)
        rec = {
            "kind": "train", "epoch": epoch + 1, "step": step, "global_step": global_step,
            "loss": vals[0], "hard": vals[1], "soft": vals[2], "weight_mean": vals[3],
            "lr": stats.lr, "img_per_s": stats.imgs / dt, "data_wait_frac": min(1.0, stats.wait / dt),
        }  # fmt: skip
        self.metrics.write(rec, step=global_step)
        stats.reset_window()
        return rec

    def _handle_corrupt(self, bad: list, epoch: int, step: int) -> None:
        self.corrupt_count += len(bad)
        for b in bad:
            msg = f"corrupt image skipped: {getattr(b, 'path', b)} ({getattr(b, 'error', '')})"
            print(f"[wsld] {msg}", file=sys.stderr, flush=True)
            self.metrics.write({"kind": "corrupt", "epoch": epoch + 1, "step": step, "path": str(getattr(b, "path", b)), "error": str(getattr(b, "error", ""))})

    def _non_finite(self, epoch: int, step: int, global_step: int) -> None:
        where = f"epoch {epoch + 1}, step {step + 1} (global step {global_step + 1})"
        if self.cfg.train.nan_policy == "skip":
            self.skipped_steps += 1
            self.say(f"non-finite loss at {where}: step skipped ({self.skipped_steps} so far)")
            self.metrics.write({"kind": "skipped_step", "epoch": epoch + 1, "step": step + 1, "global_step": global_step + 1})
            return
        last = self.run_dir / "last.pt"
        good = f"last good checkpoint: {last}" if last.is_file() else "no checkpoint was written yet"
        self.metrics.write({"kind": "diverged", "epoch": epoch + 1, "step": step + 1, "global_step": global_step + 1})
        self.metrics.close()
        raise TrainingDiverged(f"loss is not finite at {where}; stopped ({good}; set train.nan_policy=skip to skip such steps)")


def run_training(cfg: Config, run_dir: Path | str, resume: bool = False) -> dict[str, Any]:
    """Train (or resume) one run; under torchrun every process calls this with the same arguments."""
    rt = setup_runtime()
    try:
        # rank 0's folder wins: a default timestamped name may differ by a second between ranks
        run_dir = broadcast_object(rt, str(run_dir))
        return Trainer(cfg, Path(run_dir), rt, resume=resume).fit()
    finally:
        if rt.distributed and dist.is_initialized():
            dist.destroy_process_group()
