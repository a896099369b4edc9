"""``wsld train [CONFIG] [key=value ...] [--out RUN_DIR] [--resume RUN_DIR]``."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Optional

from wsld.errors import UserError


def split_config_and_overrides(items: list[str]) -> tuple[str | None, list[str]]:
    """The first item without '=' is the config file; the rest are dotted overrides."""
    config, overrides = None, []
    for item in items:
        if "=" not in item and config is None and not overrides:
            config = item
        elif "=" not in item:
            raise UserError(f"'{item}' is neither the config file (it must come first) nor a key=value override")
        else:
            overrides.append(item)
    return config, overrides


# timm's train.py flags -> what wsld takes instead: a config key (key=value), another option, or
# None (dropped: the class count comes from the data). Read only to answer a flag wsld does not know.
TIMM_FLAGS: dict[str, Optional[str]] = {
    "--epochs": "train.epochs", "--lr": "train.lr", "--batch-size": "data.batch_size_per_device",
    "-b": "data.batch_size_per_device", "--model": "model.student", "--weight-decay": "train.weight_decay",
    "--momentum": "train.momentum", "--seed": "train.seed", "--workers": "data.workers", "-j": "data.workers",
    "--opt": "train.optimizer", "--sched": "train.schedule", "--warmup-epochs": "train.warmup_epochs",
    "--img-size": "data.image_size", "--smoothing": "distill.label_smoothing", "--clip-grad": "train.grad_clip",
    "--model-ema-decay": "train.ema_decay", "--data-dir": "data.data_path", "--output": "--out",
    "--num-classes": None, "--pretrained": "model.student_weights",
}  # fmt: skip
TIMM_SWITCHES = {"--pretrained": "pretrained"}  # flags without a value: the value they stand for


def timm_flag_hint(argv: list[str]) -> Optional[str]:
    """One line for a timm-style flag given to ``wsld train``: the same command in wsld's spelling."""
    import shlex

    fixed, seen, i = [], [], 0
    while i < len(argv):
        flag, _, inline = argv[i].partition("=")
        if flag not in TIMM_FLAGS or not argv[i].startswith("-"):
            fixed.append(argv[i])
            i += 1
            continue
        if flag in TIMM_SWITCHES:
            value, i = TIMM_SWITCHES[flag], i + 1
        elif inline or "=" in argv[i]:
            value, i = inline, i + 1
        else:
            value, i = (argv[i + 1] if i + 1 < len(argv) else "N"), i + 2
        key = TIMM_FLAGS[flag]
        seen.append(argv[i - 1] if flag in TIMM_SWITCHES or "=" in argv[i - 1] else f"{flag} {value}")
        if key is None:
            continue
        fixed += [key, value] if key.startswith("-") else [f"{key}={value}"]
    if not seen:
        return None
    dropped = " (the class count comes from the data)" if any(x.startswith("--num-classes") for x in seen) else ""
    verb = "is timm's spelling" if len(seen) == 1 else "are timm's spelling"
    return f"{', '.join(seen)} {verb}; wsld train takes section.key=value overrides{dropped}: wsld {shlex.join(fixed)}"


def habit_refusal(args: argparse.Namespace, config_path: Optional[str], overrides: list[str]) -> Optional[str]:
    """One line, with the command that works, for a habit from other trainers: ``--resume RUN/last.pt``
    (wsld resumes a run folder) or a data folder where the config file goes (timm's ``train.py DATA_DIR``)."""
    import shlex

    rest = [*overrides, *(["--teacher-only"] if args.teacher_only else [])]
    if args.resume and Path(args.resume).is_file():
        folder = os.path.dirname(args.resume) or "."
        return (f"--resume takes the run folder, not a file in it ({args.resume}): "
                f"wsld train --resume {shlex.join([folder, *rest])}")
    if config_path is not None and Path(config_path).is_dir():
        return (f"{config_path} is a folder, not a config file: the data folder goes in data.data_path, e.g. for photos in "
                f"class folders: wsld train {shlex.join(['configs/own_photos_small.yaml', f'data.data_path={config_path}', *rest])}")
    return None


def elastic_restart() -> bool:
    """True in a job that torchrun restarted after a failure (``--max-restarts``)."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0) > 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="train a student (and the teacher first, when no teacher weights are given)",
        description="Train a student by distillation. With no arguments: the built-in default, WSLD on "
        "Fashion-MNIST (a cifar_resnet20_s2 teacher is trained first and cached, then a cifar_resnet8_s2 "
        "student is distilled from it, and the same student trained alone with CE beside it). CONFIG is a YAML file (see configs/); any key can be overridden as "
        "section.key=value, e.g. 'wsld train configs/imagenet_resnet34_resnet18_wsld.yaml "
        "data.data_path=/data/imagenet train.epochs=90'. Under torchrun, one process per GPU.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("args", nargs="*", metavar="[CONFIG] [key=value ...]", help="YAML config file, then dotted overrides")
    p.add_argument("--out", metavar="RUN_DIR", help="run directory (default: runs/<timestamp>-<dataset>-<loss>-<student>)")
    p.add_argument(
        "--resume", metavar="RUN_DIR",
        help="continue the run in RUN_DIR from its last checkpoint (mid-epoch included), from any directory; overrides "
        "may change where files live (data.data_path, model.teacher_weights: the same weights moved, ...), keys that "
        "do not alter the result (data.workers, train.progress, ...) and train.epochs (extends constant, step and "
        "multistep schedules; see docs/engine.md)",
    )  # fmt: skip
    p.add_argument(
        "--baseline", action=argparse.BooleanOptionalAction, default=None,
        help="also train the student alone (CE, same seed and recipe) into RUN_DIR-ce and print both "
        "(default: on for the built-in default run, `wsld train` with no CONFIG or key=value)",
    )  # fmt: skip
    p.add_argument(
        "--teacher-only", action="store_true",
        help="train only the config's teacher (model.teacher, CE with the teacher_train recipe) as a run of its own in "
        "RUN_DIR, labelled a teacher, from scratch or fine-tuned from model.teacher_weights (e.g. IMAGENET1K_V1: a new "
        "head for the data's classes); its weights go to RUN_DIR/teacher.safetensors for model.teacher_weights",
    )  # fmt: skip
    p.add_argument(
        "--allow-data-change", action="store_true",
        help="accept data other than what the run recorded (a resume, an earlier RUN_DIR-ce reused by --baseline, a "
        "soft-label store made from other images): classes renamed or reordered, images added, removed or changed; "
        "without it such data is refused with one line saying what differs",
    )  # fmt: skip
    p.set_defaults(func=run, extra_args_dest="args", unknown_option_hint=timm_flag_hint, keeps_console_log=True)


def run(args: argparse.Namespace) -> int:
    from wsld.engine.stopping import StopRequest

    # one stop request for the whole command: a SIGTERM/SIGINT in any phase (data loading, the
    # teacher's training or evaluations, the run, the --baseline run after it) stops at the next
    # stopping point with a checkpoint and the command that continues it
    with StopRequest():
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    from wsld.config import load_config, to_dict
    from wsld.models import TeacherNeedsTraining
    from wsld.engine.resume import absolute_paths
    from wsld.engine.previous_runs import previous_runs_note
    from wsld.engine.rundir import RESUME_SAFE_KEYS, config_diff, default_run_dir
    from wsld.locks import DirLock
    from wsld.run import run_training
    from wsld.teachers.training import is_teacher_run

    config_path, overrides = split_config_and_overrides(args.args)
    if why := habit_refusal(args, config_path, overrides):
        raise UserError(why)
    if args.teacher_only or (args.resume and is_teacher_run(Path(args.resume))):
        from wsld.commands.teacher_only import run_teacher_only

        return run_teacher_only(args, config_path, overrides, resume_config, note)
    if not args.resume and args.out and elastic_restart() and (Path(args.out) / "config.yaml").is_file():
        # torchrun --max-restarts: a restarted job continues its run (same command, no --resume needed)
        args.resume = args.out
    if args.resume or args.out:  # a live run there: say so, whatever else the folder holds
        DirLock(Path(args.resume or args.out)).refuse_if_held(f"run directory {args.resume or args.out}")
    if args.resume:
        run_dir = Path(os.path.abspath(args.resume))  # relative to the current directory, as usual
        saved = run_dir / "config.yaml"
        if not saved.is_file():
            raise UserError(f"cannot resume {run_dir}: no config.yaml there (is it a wsld run directory?)")
        if args.out and Path(os.path.abspath(args.out)) != run_dir:
            raise UserError("give either --resume RUN_DIR or --out RUN_DIR, not two different folders")
        cfg = resume_config(run_dir, overrides)
        if config_path is not None:
            wanted = load_config(config_path, overrides)
            absolute_paths(wanted, os.getcwd())
            diff = [k for k in config_diff(to_dict(wanted), to_dict(cfg)) if k not in RESUME_SAFE_KEYS]
            if diff:
                raise UserError(f"cannot resume {run_dir} with {config_path}: it differs in {', '.join(diff)}")
        check_baseline_dir(args, cfg, run_dir, config_path, overrides)
        args.run_dir_in_use = run_dir  # for the Ctrl-C line (wsld.cli)
        summary = run_training(cfg, run_dir, resume=True, allow_data_change=args.allow_data_change)
    else:
        cfg = load_config(config_path, overrides)
        absolute_paths(cfg, os.getcwd())  # stored absolute: the run resumes from any directory
        run_dir = Path(os.path.abspath(args.out or default_run_dir(cfg.data.dataset, cfg.distill.loss, cfg.model.student)))
        if not args.out and (seen := previous_runs_note(cfg, run_dir)):
            note(seen)
        if (run_dir / "last.pt").exists() or (run_dir / "summary.json").exists():
            raise UserError(f"{run_dir} already holds a run: use --resume {run_dir} to continue it, or another --out")
        check_baseline_dir(args, cfg, run_dir, config_path, overrides)
        args.run_dir_in_use = run_dir  # for the Ctrl-C line (wsld.cli)
        try:
            summary = run_training(cfg, run_dir, allow_data_change=args.allow_data_change)
        except TeacherNeedsTraining as e:  # an ImageNet teacher on other classes: the two commands that work
            raise UserError(f"{e}: {fine_tune_first(args, config_path, overrides, cfg, e.weights)}") from None
    baseline = None
    if wants_baseline(args, cfg, config_path, overrides):
        baseline = train_baseline(cfg, Path(summary["run_dir"]), args.allow_data_change)
    if int(os.environ.get("RANK", "0")) == 0:
        print_report(summary, baseline, cfg.train.lr)
    return 0


def fine_tune_first(args: argparse.Namespace, config_path: Optional[str], overrides: list[str], cfg, start: str) -> str:
    """The two commands that give a pretrained teacher the data's classes, then distil from it."""
    import shlex

    from wsld.teachers.training import TEACHER_WEIGHTS

    teacher_dir = f"{args.out}-teacher" if args.out else f"runs/teacher-{cfg.data.dataset}"
    head = ["wsld", "train", *([config_path] if config_path else [])]
    kept = [o for o in overrides if not o.startswith("model.teacher_weights=")]
    first = [*head, *kept, f"model.teacher_weights={start}", "--teacher-only", "--out", teacher_dir]
    second = [*head, *kept, f"model.teacher_weights={teacher_dir}/{TEACHER_WEIGHTS}", *(["--out", args.out] if args.out else [])]
    return f"fine-tune it first, then distil: {shlex.join(first)} && {shlex.join(second)}"


def resume_config(run_dir: Path, overrides: list[str]):
    """The run's saved config with the resume's overrides, paths absolute, refused (UserError) when
    an override would change the run's maths (``wsld.engine.resume.resume_refusal``).

    Relative paths of a run saved before paths were stored absolute resolve against the run's
    recorded working directory (``run.json``), else against the current one; a note says which.
    Overrides typed now resolve against the current directory.
    """
    from wsld.config import load_config, to_dict
    from wsld.engine.resume import MOVABLE_FILE_KEYS, absolute_paths, read_run_record, resume_refusal
    from wsld.engine.rundir import config_diff

    record = read_run_record(run_dir)
    started_in = record.get("cwd") if record else None
    base = load_config(run_dir / "config.yaml")
    relative = absolute_paths(base, started_in or os.getcwd())
    if relative:
        where = (f"the run's working directory {started_in} (run.json)" if started_in
                 else f"the current directory {os.getcwd()} (the run records no working directory)")  # fmt: skip
        note(f"{run_dir / 'config.yaml'} holds relative paths ({', '.join(relative)}): resolved against {where}")
    cfg = load_config(None, overrides, base=to_dict(base))
    absolute_paths(cfg, os.getcwd())
    why = resume_refusal(run_dir, base, cfg, record)
    if why:
        raise UserError(why)
    moved = [k for k in config_diff(to_dict(base), to_dict(cfg)) if k in MOVABLE_FILE_KEYS]
    if moved and record is None:
        note(f"{run_dir} records no digests of its files (made by an older wsld): {', '.join(moved)} is checked only by loading it")
    if started_in and started_in not in sys.path and ":" in cfg.model.student + cfg.model.teacher:
        sys.path.append(started_in)  # package.module:callable models found where the run started
    return cfg


def note(msg: str) -> None:
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"[wsld] note: {msg}", file=sys.stderr, flush=True)


def wants_baseline(args: argparse.Namespace, cfg, config_path: Optional[str], overrides: list[str]) -> bool:
    """--baseline, or by default the built-in run (no CONFIG, no key=value, not a resume); never for CE itself."""
    want = args.baseline if args.baseline is not None else (config_path is None and not overrides and not args.resume)
    return bool(want) and cfg.distill.loss != "ce"


def baseline_dir(run_dir: Path) -> Path:
    return run_dir.with_name(run_dir.name + "-ce")


def check_baseline_dir(args: argparse.Namespace, cfg, run_dir: Path, config_path: Optional[str], overrides: list[str]) -> None:
    """Before any training: RUN_DIR-ce, when it holds a finished run, must be this baseline (it is
    reused, never replaced): same student, seed and recipe (and data, once RUN_DIR records it)."""
    summary = baseline_dir(run_dir) / "summary.json"
    if not wants_baseline(args, cfg, config_path, overrides) or not summary.is_file():
        return
    _refuse_other_baseline(summary.parent, cfg, run_dir, args.allow_data_change)


def _ce_config(cfg):
    from wsld.config import config_from_dict, to_dict

    d = to_dict(cfg)
    d["distill"].update(loss="ce", params={})
    return config_from_dict(d)


def _refuse_other_baseline(done: Path, cfg, run_dir: Path, allow_data_change: bool) -> None:
    from wsld.engine.previous_runs import baseline_refusal

    why = baseline_refusal(done, _ce_config(cfg), run_dir, allow_data_change)
    if why:
        raise UserError(why)


def train_baseline(cfg, run_dir: Path, allow_data_change: bool = False) -> Optional[dict]:
    """The student alone with CE, same seed and recipe, in ``RUN_DIR-ce`` (reused when finished,
    resumed when not): the first run answers "what did distillation add?"."""
    import json

    from wsld.run import run_training

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        print("[wsld] --baseline: skipped under torchrun (train it as its own run: distill.loss=ce)", file=sys.stderr)
        return None
    ce_cfg = _ce_config(cfg)
    ce_dir = baseline_dir(run_dir)
    if (ce_dir / "summary.json").is_file():  # its recipe was checked before the run; its data can be now
        _refuse_other_baseline(ce_dir, cfg, run_dir, allow_data_change)
        return json.loads((ce_dir / "summary.json").read_text())
    print(f"[wsld] baseline: the same student, seed and recipe with CE alone, in {ce_dir}", file=sys.stderr)
    return run_training(ce_cfg, ce_dir, resume=(ce_dir / "last.pt").is_file(), allow_data_change=allow_data_change)


def print_report(s: dict, baseline: Optional[dict] = None, train_lr: Optional[float] = None) -> None:
    out = sys.stdout
    source = s["teacher"] or (f"soft labels {s['soft_labels']}" if s.get("soft_labels") else "no teacher")
    print(f"\nwsld result: {s['loss']} ({source} -> {s['student']}), {s['epochs']} epochs, run {s['run_dir']}", file=out)
    if s.get("teacher_top1") is not None:
        bn = f", BatchNorm {s['teacher_bn_mode']} mode in distillation" if s.get("teacher_bn_mode") else ""
        print(f"  teacher {s['teacher']:<14} top-1 {s['teacher_top1']:6.2f}  top-5 {s['teacher_top5']:6.2f}  <- evaluated once at the start{bn}", file=out)
    print(f"  student {s['student']:<14} top-1 {s['last_top1']:6.2f}  top-5 {s['last_top5']:6.2f}  <- last epoch ({s['epochs']}), last.pt: the number to report", file=out)
    print(f"  student {'(best epoch)':<14} top-1 {s['best_top1']:6.2f}                <- best.pt, epoch {s['best_epoch']} (picked on val: optimistic)", file=out)
    if s.get("ema_last_top1") is not None:
        print(f"  student {'(EMA)':<14} top-1 {s['ema_last_top1']:6.2f}  top-5 {s['ema_last_top5']:6.2f}  <- EMA weights in last.pt (wsld eval --ema), last epoch", file=out)
    if s.get("corrupt_images"):
        print(f"  {s['corrupt_images']} corrupt images were skipped (see metrics.jsonl)", file=out)
    if s.get("skipped_steps"):
        print(f"  {s['skipped_steps']} steps with a non-finite loss were skipped", file=out)
    if baseline is not None:
        name = "student alone (CE)"
        print(f"  {name:<22} top-1 {baseline['last_top1']:6.2f}  top-5 {baseline['last_top5']:6.2f}  <- same student, seed and recipe, no teacher (run {baseline['run_dir']})", file=out)
        gain = s["last_top1"] - baseline["last_top1"]
        lr = f" (train.lr {train_lr:g})" if train_lr is not None else ""
        print(f"  {s['loss']} - CE: {gain:+.2f} points, and what it is not: one seed (no interval), CE at {s['loss']}'s learning "
              f"rate{lr} rather than one tuned for it, so not the method's gain (`wsld compare CONFIG` "
              "compares tuned rows over seeds with 95% CIs)", file=out)
