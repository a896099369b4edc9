"""Training a teacher with CE: cached when no weights are given (one entry per teacher setup, locked while it trains), or as its own run (wsld train --teacher-only)."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Callable, Optional

from wsld import console_log
from wsld.checkpoint import load_checkpoint, save_weights
from wsld.config import Config, load_config, to_dict
from wsld.data.identity import identity_digest
from wsld.engine.loop import Trainer
from wsld.engine.rundir import RESUME_SAFE_KEYS
from wsld.locks import DirLock
from wsld.models import architecture_fingerprint
from wsld.runtime import Runtime, barrier

# train.threads is copied into the teacher's config (both phases of a first run use the same
# threads, so a first run killed in its student phase resumes bit-identical) but, like the other
# speed settings, does not change which cached teacher a setup uses
# data.batch_size_per_device is always null once read (it became data.batch_size)
CACHE_KEY_IGNORED = RESUME_SAFE_KEYS | {"train.threads", "data.batch_size_per_device"}


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
    # model.teacher_weights, if any, is where the teacher's training starts (--teacher-only: a pretrained
    # network fine-tuned on this data, with a new head if its classes differ); null: from scratch, as cached
    start = cfg.model.teacher_weights
    d["model"].update(student=cfg.model.teacher, student_weights=start, teacher_weights=None,
                      replace_head=cfg.model.replace_head if start else False)
    d["distill"].update(loss="ce")
    for k in ("base_batch_size", "optimizer", "momentum", "nesterov", "wd_norm_bias", "step_size", "milestones",
              "gamma", "grad_clip", "amp", "seed", "deterministic", "nan_policy", "log_every", "progress", "threads"):  # fmt: skip
        d["train"][k] = src["train"][k]
    d["train"].update(epochs=tt.epochs, lr=tt.lr, weight_decay=tt.weight_decay, schedule=tt.schedule, ema_decay=0.0, warmup_epochs=0.0)
    return load_config(None, base=d)  # validated like any run's config, so a resume compares like with like


# The teacher trains with CE, so its distill section is a constant; it is hashed as the versions
# before per-loss parameters wrote it, so the teachers they cached stay valid.
_TEACHER_DISTILL = {"loss": "ce", "T": 4.0, "alpha": 2.5, "label_smoothing": 0.0, "params": {}, "soft_labels": None,
                    "allow_weak_teacher": False}  # fmt: skip


def teacher_cache_key(cfg: Config, data_id: str = "") -> str:
    """Hash of everything that changes the trained teacher: its training config (minus
    resume-safe keys), its architecture and ``data_id``, the digest of the data's identity
    (``wsld.data.identity``: two datasets behind one ``data.dataset`` name get two teachers)."""
    d = to_dict(teacher_training_config(cfg))
    d["distill"] = dict(_TEACHER_DISTILL)
    for dotted in CACHE_KEY_IGNORED:
        section, key = dotted.split(".")
        d[section].pop(key, None)
    d["architecture"] = architecture_fingerprint(cfg.model.teacher)
    if data_id:
        d["data_identity"] = data_id
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:12]


def teacher_cache_dir(cfg: Config, data: Optional[dict] = None) -> Path:
    """The cache entry of ``cfg``'s teacher; ``data``: the identity of ``cfg``'s data
    (``wsld.data.identity``), computed here when not given."""
    if data is None:
        from wsld.data.build import build_datasets
        from wsld.data.identity import data_identity

        data = data_identity(*build_datasets(cfg.data, seed=cfg.train.seed)[:2])
    key = teacher_cache_key(cfg, identity_digest(data))
    return Path(os.path.expanduser(cfg.model.teacher_cache)) / f"{cfg.data.dataset}-{cfg.model.teacher}-{key}"


TEACHER_WEIGHTS = "teacher.safetensors"  # beside a teacher run's checkpoints: what model.teacher_weights takes


def train_teacher_run(tcfg: Config, run_dir: Path, rt: Runtime, *, resume: bool, weights: Optional[Path] = None,
                      allow_data_change: bool = False) -> dict:  # fmt: skip
    """Train (or resume) a teacher with ``tcfg`` (from ``teacher_training_config``) in ``run_dir``,
    labelled as a teacher throughout, and write its last weights to ``weights``
    (default ``run_dir/teacher.safetensors``); returns the run's summary."""
    summary = Trainer(tcfg, run_dir, rt, resume=resume, role="teacher", allow_data_change=allow_data_change).fit()
    if rt.is_main:
        save_weights(load_checkpoint(run_dir / "last.pt")["student"], weights or run_dir / TEACHER_WEIGHTS)
    barrier(rt)
    return summary


def is_teacher_run(run_dir: Path) -> bool:
    """Whether ``run_dir`` was started as a teacher run (its first metrics record says so)."""
    try:
        with open(run_dir / "metrics.jsonl") as f:
            first = json.loads(f.readline() or "{}")
    except (OSError, ValueError):
        return False
    return first.get("kind") == "start" and first.get("role") == "teacher"


def ensure_teacher(cfg: Config, rt: Runtime, log: Callable[[str], None], data: Optional[dict] = None) -> str:
    """Path of the teacher's weights: given, or trained once and cached (an interrupted teacher
    run resumes from its own checkpoint next time). ``data``: the identity of ``cfg``'s data
    (``wsld.data.identity``), part of the cache key; computed here when not given."""
    if cfg.model.teacher_weights:
        return cfg.model.teacher_weights
    cache = teacher_cache_dir(cfg, data)
    weights = cache / "teacher.safetensors"
    if weights.is_file():
        log(f"teacher: reusing {weights}")
        return str(weights)
    lock = DirLock(cache)
    if rt.is_main:  # one process trains a cache entry; another one with the same setup waits for it
        cache.mkdir(parents=True, exist_ok=True)
        lock.acquire_waiting(log, f"teacher cache entry {cache}")
    barrier(rt)
    try:
        if weights.is_file():  # trained by the process we waited for
            log(f"teacher: reusing {weights}")
            return str(weights)
        tcfg = teacher_training_config(cfg)
        run = cache / "run"
        log(f"teacher: no model.teacher_weights given, training {cfg.model.teacher} with CE for {tcfg.train.epochs} epochs (cached in {cache})")
        with console_log.detached_after():  # the cache entry's log.txt holds the teacher's part only
            train_teacher_run(tcfg, run, rt, resume=(run / "last.pt").is_file(), weights=weights)
        return str(weights)
    finally:
        lock.release()
