"""Earlier runs of the same config under ``runs/``: a new default folder should not hide the run it repeats.

``wsld train CONFIG`` without ``--out`` makes a new timestamped folder each time; run twice, the
second silently starts over beside the first. ``previous_runs`` finds the earlier folders whose
saved config equals this one (up to keys that do not change the maths), so the start can say
where they are and how to continue one.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from wsld.config import Config, load_config, to_dict
from wsld.engine.rundir import RESUME_SAFE_KEYS, config_diff, config_value
from wsld.errors import UserError

MAX_SCANNED = 200  # the newest folders only: a start must stay quick in a big runs/


@dataclass
class PreviousRun:
    path: Path
    state: str  # "finished", "checkpointed" or "no checkpoint"
    top1: Optional[float] = None  # the last epoch's, for a finished run

    def describe(self) -> str:
        if self.state == "finished":
            return f"{self.path} (finished" + (f", top-1 {self.top1:.2f})" if self.top1 is not None else ")")
        return f"{self.path} ({'stopped, checkpoint saved' if self.state == 'checkpointed' else 'stopped before its first checkpoint'})"


def _state(run_dir: Path) -> tuple[str, Optional[float]]:
    summary = run_dir / "summary.json"
    if summary.is_file():
        try:
            top1: Any = json.loads(summary.read_text()).get("last_top1")
        except (OSError, ValueError, AttributeError):
            top1 = None
        return "finished", float(top1) if isinstance(top1, (int, float)) else None
    return ("checkpointed" if (run_dir / "last.pt").is_file() else "no checkpoint"), None


def previous_runs(cfg: Config, runs_root: Path, exclude: Optional[Path] = None) -> list[PreviousRun]:
    """Run folders under ``runs_root`` (newest first) whose config.yaml matches ``cfg`` up to resume-safe keys."""
    if not runs_root.is_dir():
        return []
    mine = to_dict(cfg)
    dirs = sorted((d for d in runs_root.iterdir() if (d / "config.yaml").is_file()), key=lambda d: d.name, reverse=True)
    found = []
    for d in dirs[:MAX_SCANNED]:
        if exclude is not None and d.resolve() == exclude.resolve():
            continue
        try:
            theirs = to_dict(load_config(d / "config.yaml"))
        except (UserError, OSError):
            continue  # a folder from another version or a damaged one: not this config
        if all(k in RESUME_SAFE_KEYS for k in config_diff(mine, theirs)):
            found.append(PreviousRun(d, *_state(d)))
    return found


def previous_runs_note(cfg: Config, new_dir: Path) -> Optional[str]:
    """One line for the start of a run in a new default folder, or None when nothing earlier matches."""
    found = previous_runs(cfg, new_dir.parent, exclude=new_dir)
    if not found:
        return None
    latest = found[0]
    more = f" (and {len(found) - 1} more)" if len(found) > 1 else ""
    how = "" if latest.state == "finished" else f"; to continue it instead: wsld train --resume {latest.path}"
    return f"the same config already ran in {latest.describe()}{more}; starting a new run in {new_dir}{how}"


def _not_read_by_ce(key: str) -> bool:
    """Config keys a CE student run does not read (the teacher's, its training's, the distillation
    loss's) or that do not change its maths (``RESUME_SAFE_KEYS``)."""
    return (key in RESUME_SAFE_KEYS or key.startswith(("model.teacher", "teacher_train."))
            or (key.startswith("distill.") and not key.startswith(("distill.loss", "distill.params"))))  # fmt: skip


def baseline_refusal(done: Path, ce_cfg: Config, run_dir: Path, allow_data_change: bool = False) -> Optional[str]:
    """Why the finished run in ``done`` (``RUN_DIR-ce``) is not the CE baseline of ``ce_cfg`` that
    ``--baseline`` would train, or None: same student, seed and recipe (every key a CE run reads),
    and, once ``run_dir`` records its data, the same data (unless ``allow_data_change``)."""
    from wsld.data.identity import OVERRIDE, identity_difference
    from wsld.engine.resume import read_run_record

    move = "move it, or give --out another name"
    try:
        saved = load_config(done / "config.yaml")
    except (UserError, OSError):
        return f"--baseline: {done} holds another finished run (no readable config.yaml to compare with); {move}"
    want = load_config(None, base=to_dict(ce_cfg))  # resolved as the trainer resolves it
    there, here = to_dict(saved), to_dict(want)
    diff = [k for k in config_diff(there, here) if not _not_read_by_ce(k)]
    if diff:
        shown = ", ".join(f"{k} ({config_value(there, k)} there, {config_value(here, k)} here)" for k in diff[:3])
        more = ", ..." if len(diff) > 3 else ""
        return f"--baseline: {done} holds another finished run, made with other {shown}{more}: not this run's baseline; {move}"
    if allow_data_change:
        return None
    ours, theirs = read_run_record(run_dir), read_run_record(done)
    why = identity_difference((theirs or {}).get("data"), ((ours or {}).get("data")) or {}) if ours and ours.get("data") else None
    if why:
        return f"--baseline: {done} holds another finished run, trained on other data ({why}); {move} (or pass {OVERRIDE} to reuse it)"
    return None
