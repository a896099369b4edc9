"""``wsld train CONFIG --teacher-only``: train the config's teacher as a run of its own, labelled a teacher.

The usual "train my own teacher, then distil" recipe: the teacher is trained with CE and the
config's ``teacher_train`` recipe on the config's data, from scratch (exactly what the cache would
hold) or, with ``model.teacher_weights``, fine-tuned from those weights (ImageNet's, with a new head
for the data's classes), in a run folder the user names; its weights land in
``RUN/teacher.safetensors`` for ``model.teacher_weights`` of the distillation run.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path
from typing import Any, Callable, Optional

from wsld.errors import UserError


def default_teacher_dir(dataset: str, teacher: str) -> Path:
    from wsld.engine.rundir import default_run_dir

    return default_run_dir(dataset, "teacher", teacher)


def run_teacher_only(args: argparse.Namespace, config_path: Optional[str], overrides: list[str],
                     resume_config: Callable[[Path, list[str]], Any], note: Callable[[str], None]) -> int:
    """The --teacher-only run; ``resume_config`` and ``note`` are ``wsld train``'s (the resume rules are the same)."""
    from wsld.config import load_config
    from wsld.engine.resume import absolute_paths
    from wsld.runtime import broadcast_object, setup_runtime, teardown_runtime
    from wsld.teachers.training import TEACHER_WEIGHTS, is_teacher_run, teacher_training_config, train_teacher_run

    if args.baseline:
        raise UserError("--baseline trains a student alone; it has no meaning with --teacher-only")
    if args.resume:
        run_dir = Path(os.path.abspath(args.resume))
        if not (run_dir / "config.yaml").is_file():
            raise UserError(f"cannot resume {run_dir}: no config.yaml there (is it a wsld run directory?)")
        if not is_teacher_run(run_dir) and (run_dir / "metrics.jsonl").is_file():
            raise UserError(f"{run_dir} is a student run, not a teacher run: resume it without --teacher-only")
        if config_path is not None:
            raise UserError("--resume continues a run with its own saved config: give no CONFIG file")
        tcfg = resume_config(run_dir, overrides)  # the saved config is already the teacher's
        resume = True
    else:
        cfg = load_config(config_path, overrides)
        absolute_paths(cfg, os.getcwd())
        tcfg = teacher_training_config(cfg)
        run_dir = Path(os.path.abspath(args.out or default_teacher_dir(cfg.data.dataset, cfg.model.teacher)))
        if (run_dir / "last.pt").exists() or (run_dir / "summary.json").exists():
            raise UserError(f"{run_dir} already holds a run: use --teacher-only --resume {run_dir} to continue it, or another --out")
        resume = False
    args.run_dir_in_use = run_dir  # for the Ctrl-C line (wsld.cli)
    rt = setup_runtime()
    try:
        run_dir = Path(broadcast_object(rt, str(run_dir)))
        summary = train_teacher_run(tcfg, run_dir, rt, resume=resume, allow_data_change=args.allow_data_change)
    finally:
        teardown_runtime(rt)
    if int(os.environ.get("RANK", "0")) == 0:
        weights = run_dir / TEACHER_WEIGHTS
        out = sys.stdout
        start = f"fine-tuned from {tcfg.model.student_weights}" if tcfg.model.student_weights else "trained from scratch"
        print(f"\nwsld result: teacher {summary['student']} {start} with CE, {summary['epochs']} epochs, run {run_dir}", file=out)
        print(f"  teacher {summary['student']:<14} top-1 {summary['last_top1']:6.2f}  top-5 {summary['last_top5']:6.2f}  <- last epoch, the weights kept", file=out)
        print(f"  weights: {weights}", file=out)
        same = [o for o in overrides if not o.startswith("model.teacher_weights=")] if not args.resume else []
        cmd = " ".join(shlex.quote(x) for x in [config_path or "CONFIG", *same, f"model.teacher_weights={weights}"])
        print(f"  distil from it: wsld train {cmd}", file=out)
    return 0
