"""What a resume may change: the run's absolute paths, its record of where it started (``run.json``:
working directory, the digests of the files it read and the data's identity), which overrides a resume accepts, and the
rule for a new ``train.epochs`` (docs/engine.md, "Resume").

A run's config holds absolute paths (``absolute_paths``), so it resumes from any directory. What a
file holds is pinned by content, not by name: ``run.json`` records a SHA-256 of the teacher's
weights (given or cached), of ``model.student_weights`` and of the soft-label store's identity, and a
resume whose files hold something else is refused (``check_run_files``); it records the data's
identity too (``wsld.data.identity``), and a resume on other data is refused (``check_data``).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Callable, Optional

from wsld.config import Config, to_dict
from wsld.engine.optim import lr_factor
from wsld.engine.rundir import RESUME_SAFE_KEYS, config_diff, config_value
from wsld.errors import UserError
from wsld.files import atomic_write_text

RUN_RECORD = "run.json"
RECORD_FORMAT = "wsld-run-1"
# config keys that hold a path; made absolute when a run starts (``~`` expanded)
PATH_KEYS = ("data.data_path", "model.teacher_weights", "model.student_weights", "model.teacher_cache", "distill.soft_labels")
# path keys whose file's content is part of the run: on resume they may point at the same content elsewhere
MOVABLE_FILE_KEYS = ("model.teacher_weights", "model.student_weights", "distill.soft_labels")
# keys in which a checkpoint's config may differ from the resumed run's: the safe keys, paths (an old
# checkpoint holds relative ones; moved files are checked by content) and train.epochs (epochs_refusal)
NOT_COMPARED_ON_RESUME = frozenset(RESUME_SAFE_KEYS | set(PATH_KEYS) | {"train.epochs"})
# what each record entry of ``run.json`` is, for messages
_RECORDED = {"teacher": "model.teacher_weights", "student_weights": "model.student_weights", "soft_labels": "distill.soft_labels"}


def _get(cfg: Config, key: str) -> Any:
    section, name = key.split(".")
    return getattr(getattr(cfg, section), name)


def _is_file_value(key: str, value: Optional[str]) -> bool:
    """A path (not null; for weights not a torchvision enum name such as ``IMAGENET1K_V1``)."""
    from wsld.models import is_weight_file

    return bool(value) and (not key.endswith("_weights") or is_weight_file(value))


def absolute_paths(cfg: Config, base: str | Path) -> list[str]:
    """Make every path-valued key of ``cfg`` absolute, relative ones resolved against ``base``
    (``~`` expanded; enum names and ``package.module:callable`` model names untouched). Returns the
    keys that were relative."""
    relative = []
    for key in PATH_KEYS:
        value = _get(cfg, key)
        if not _is_file_value(key, value):
            continue
        p = os.path.expanduser(value)
        if not os.path.isabs(p):
            relative.append(key)
            p = os.path.join(base, p)
        section, name = key.split(".")
        setattr(getattr(cfg, section), name, os.path.normpath(p))
    return relative


def read_run_record(run_dir: Path) -> Optional[dict]:
    """``RUN_DIR/run.json`` (None for a run made before wsld wrote one, or an unreadable one)."""
    try:
        rec = json.loads((Path(run_dir) / RUN_RECORD).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return rec if isinstance(rec, dict) and rec.get("format") == RECORD_FORMAT else None


def weights_sha256(path: str | Path) -> str:
    """SHA-256 of a weight file's state dict (names, dtypes, shapes, bytes): the same weights saved
    in another format or under another name give the same digest."""
    import torch

    from wsld.checkpoint import read_weights

    state = read_weights(path)
    h = hashlib.sha256()
    for k in sorted(state):
        v = state[k].detach().cpu().contiguous()
        h.update(f"{k}|{v.dtype}|{tuple(v.shape)}|".encode())
        h.update(v.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def store_sha256(path: str | Path) -> str:
    """SHA-256 of a soft-label store's identity (teacher digest, crops, seed, data keys, labels...)."""
    from wsld.soft_labels.store import IDENTITY_KEYS, SoftLabelStore

    meta = SoftLabelStore(path).meta
    return hashlib.sha256(json.dumps({k: meta.get(k) for k in IDENTITY_KEYS}, sort_keys=True).encode()).hexdigest()


def file_digests(cfg: Config, teacher: dict) -> dict[str, dict[str, str]]:
    """``{entry: {"path", "sha256"}}`` of the files this run reads; ``teacher`` is the teacher
    source's ``describe()`` (its ``teacher_weights`` is the file actually loaded, cached ones included)."""
    found = [("teacher", "model.teacher_weights", teacher.get("teacher_weights"), weights_sha256),
             ("student_weights", "model.student_weights", cfg.model.student_weights, weights_sha256),
             ("soft_labels", "distill.soft_labels", teacher.get("soft_labels"), store_sha256)]  # fmt: skip
    return {entry: {"path": os.path.abspath(os.path.expanduser(path)), "sha256": digest(path)}
            for entry, key, path, digest in found if _is_file_value(key, path)}  # fmt: skip


def write_run_record(run_dir: Path, cfg: Config, teacher: dict, data: Optional[dict], *, replace: bool = False) -> None:
    """Write ``run.json`` once: at a fresh start (``replace``: a record left by an earlier start in
    this folder goes), or at the first resume of a run made before wsld wrote one. On a resume
    (every check passed) only ``data`` is brought up to date: an older record gains the data's
    identity, and a change accepted with --allow-data-change becomes what the next resume expects."""
    path = Path(run_dir) / RUN_RECORD
    rec = read_run_record(run_dir) if path.exists() and not replace else None
    if rec is not None:
        if rec.get("data") == data:
            return
        rec["data"] = data
    elif path.exists() and not replace:  # unreadable or of another format: left as it is
        return
    else:
        rec = {"format": RECORD_FORMAT, "cwd": os.getcwd(), "run_dir": str(Path(run_dir).absolute()),
               "files": file_digests(cfg, teacher), "data": data}  # fmt: skip
    atomic_write_text(path, json.dumps(rec, indent=2) + "\n")


def check_run_files(run_dir: Path, cfg: Config, teacher: dict) -> None:
    """On resume: the files the run reads now hold what they held when it started (digests in
    ``run.json``; a run without one is checked only by the loads themselves: shapes, store checks)."""
    rec = read_run_record(run_dir)
    if rec is None:
        return
    now = file_digests(cfg, teacher)
    for entry, was in (rec.get("files") or {}).items():
        cur = now.get(entry)
        if cur is not None and cur["sha256"] != was.get("sha256"):
            key = _RECORDED.get(entry, entry)
            raise UserError(
                f"cannot resume {run_dir}: {cur['path']} ({key}) holds other contents than the file the run started with "
                f"({was.get('path')}, sha256 {str(was.get('sha256'))[:12]}... in {RUN_RECORD}); give {key}= that file"
            )


def check_data(recorded: Optional[dict], info, run_dir: Path, say: Callable[[str], None]) -> None:
    """On resume: the data (``info.identity``) is the data the run was trained on, by the identity in
    ``recorded`` (``run.json``, or a checkpoint's ``{"classes", "data"}``; a run made before wsld
    recorded one is checked by its class list alone). Refused with one line saying what differs,
    unless ``info.allow_data_change`` (--allow-data-change)."""
    from wsld.data.identity import check_identity, recorded_identity

    check_identity(recorded_identity(recorded), info.identity, refusal=f"cannot resume {run_dir}: its data changed since it started: {{diff}}; give "
                   "data.data_path= the run's data", subject=f"resuming {run_dir}", allow=info.allow_data_change, say=say)  # fmt: skip


def resume_refusal(run_dir: Path, run: Config, new: Config, record: Optional[dict]) -> Optional[str]:
    """Why ``new`` (the run's config with the resume's overrides) may not continue ``run``, or None.

    Allowed: ``RESUME_SAFE_KEYS`` (where data lives, speed, logging), ``train.epochs`` (checked
    against the checkpoint by ``epochs_refusal``), and a moved file for ``MOVABLE_FILE_KEYS``: a
    file given for a file (for ``model.teacher_weights`` also for a teacher trained and cached by
    the run, when ``run.json`` recorded its digest), its content checked by ``check_run_files``.
    """
    bad = []
    a, b = to_dict(run), to_dict(new)
    for key in config_diff(a, b):
        if key in RESUME_SAFE_KEYS or key == "train.epochs":
            continue
        old, cur = config_value(a, key), config_value(b, key)
        if key in MOVABLE_FILE_KEYS and _is_file_value(key, cur):
            cached = key == "model.teacher_weights" and old is None and "teacher" in ((record or {}).get("files") or {})
            if _is_file_value(key, old) or cached:
                continue
        bad.append(f"{key} ({old} -> {cur})")
    if not bad:
        return None
    return (f"cannot resume {run_dir} with changed {', '.join(bad)}: it would change the run's maths (a resume may change only where "
            "files live, speed and logging keys, and train.epochs; start a new run instead)")  # fmt: skip


def epochs_refusal(run_dir: Path, old: Config, new: Config, epoch: int, step_in_epoch: int, global_step: int, steps_per_epoch: int) -> Optional[str]:
    """Why the checkpoint (``epoch`` epochs done, ``step_in_epoch`` steps into the next, ``global_step``
    in all) cannot continue with ``new.train.epochs``, or None.

    The rule, for every schedule: the new length must give the rate the run used at every step it
    has taken (then the run ends as one configured with the new length from the start). constant,
    step and multistep do not depend on the length: they always extend; cosine does after its first
    step past warmup, so it is refused.
    """
    a, b = old.train.epochs, new.train.epochs
    if a == b:
        return None
    started = epoch + (1 if step_in_epoch else 0)
    if b < started:
        done = f"{epoch} epochs" + (f" and {step_in_epoch} steps of epoch {epoch + 1}" if step_in_epoch else "")
        return f"cannot resume {run_dir} with train.epochs={b}: it has already trained {done} (give train.epochs >= {started})"
    for s in range(global_step):
        if lr_factor(old, s / steps_per_epoch) != lr_factor(new, s / steps_per_epoch):
            return (f"cannot resume {run_dir} with train.epochs={b} (it was {a}): train.schedule={new.train.schedule} is defined by "
                    f"its total length, so the rates of the {global_step} steps already taken would change (start a new run with "
                    f"train.epochs={b}, or use a constant, step or multistep schedule)")  # fmt: skip
    return None


def set_aside_summary(run_dir: Path, old_epochs: int, new_epochs: int, say: Callable[[str], None]) -> None:
    """An extended finished run: its ``summary.json`` becomes ``summary_epochs_<old>.json`` (kept),
    so that ``summary.json`` again means "finished" (at the new length) when it comes back."""
    summary, kept = Path(run_dir) / "summary.json", Path(run_dir) / f"summary_epochs_{old_epochs}.json"
    if old_epochs == new_epochs or not summary.is_file() or kept.exists():
        return
    os.replace(summary, kept)
    say(f"extending the run from {old_epochs} to {new_epochs} epochs; its summary of {old_epochs} epochs is kept as {kept}")
