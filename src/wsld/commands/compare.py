"""The ``wsld compare`` argument parser (the comparison itself lives in ``wsld.demo``)."""

from __future__ import annotations

import argparse
import os
import shlex
from pathlib import Path

from wsld.demo.plan import DEFAULT_ROWS, ROW_BY_KEY, Settings

DEFAULT_LIMIT = Settings(config=None).limit
DEFAULT_HOLDOUT = Settings(config=None).holdout


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got '{text}'") from None


def _float(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got '{text}'") from None


def add_common(p: argparse.ArgumentParser) -> None:
    """Options shared by ``wsld compare`` and ``wsld demo``."""
    p.add_argument("--seeds", type=_int, metavar="N", help="seeds per row (default 3)")
    p.add_argument("--epochs", type=_int, metavar="E", help="student epochs of every run (default: the config's train.epochs)")
    p.add_argument("--teacher-epochs", type=_int, metavar="E",
                   help="teacher epochs (default: the config's teacher_train.epochs)")
    p.add_argument("--budget", type=_float, metavar="X",
                   help="multiply every run's epochs by X (0.5: about half the time; default 1)")
    p.add_argument("--jobs", type=_int, metavar="N",
                   help="runs at a time, each a 'wsld' process (default: 2 on a CPU machine with 2+ cores, 1 with CUDA; "
                   "1 runs them one by one in this process)")
    p.add_argument("--threads", type=_int, metavar="T", help="torch threads per run (default: CPU cores / jobs)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Registers ``wsld compare``."""
    p = sub.add_parser(
        "compare",
        help="does distillation help on my data, and with which loss? A fair comparison (teacher, student alone, "
        "KD, WSLD, ...) with searched values, several seeds and paired 95%% intervals",
        description="Compare the student trained alone (CE) with distilled rows (KD, WSLD, WSLD with weights fixed at "
        "1, DKD, DIST) on any config and data: a teacher trained at its own searched rate (or the config's "
        "model.teacher_weights), a held-out share of the training images for every choice (never the val/test split), "
        "a search per row that brackets lr, T and the loss's weight on log grids that grow while the best point sits at "
        "an edge, the same number of search runs per row, then every row over N seeds, and a report (report.md, "
        "results.json, plots) with every paired difference and its 95% t-interval and, in words, where each loss "
        "wins, ties and loses. Prints the estimated time first. Running the same command again reuses finished runs "
        "and resumes unfinished ones. See docs/compare.md.",
    )
    p.add_argument("args", nargs="*", metavar="[CONFIG] [key=value ...]", help="YAML config file, then dotted overrides")
    p.add_argument("--losses", nargs="+", choices=list(ROW_BY_KEY), metavar="ROW",
                   help=f"rows among {' '.join(ROW_BY_KEY)} (default: {' '.join(DEFAULT_ROWS)})")
    p.add_argument("--out", metavar="DIR", help="run folder (default: runs/compare-<config name>)")
    add_common(p)
    p.add_argument("--holdout", type=_float, default=DEFAULT_HOLDOUT, metavar="F",
                   help="share of each class's training images held out for the search (default: %(default)s)")
    p.add_argument("--search-limit", type=_int, default=DEFAULT_LIMIT, metavar="K",
                   help="points each searched value's grid may add beyond its first 3 while its best is at an edge "
                   "(default: %(default)s); a value still at the edge is flagged in the report")
    p.add_argument("--no-search", action="store_true",
                   help="no search: the config's lr and T, each loss's published parameters, the teacher at "
                   "teacher_train.lr or model.teacher_weights (e.g. the CIFAR-100 protocol on a GPU)")
    p.set_defaults(func=run, extra_args_dest="args")


def runtime_defaults(args: argparse.Namespace, in_process: bool = False) -> tuple[int, int]:
    """(jobs, threads): 2 processes of 1 thread on a 2+ core CPU machine, 1 with CUDA or ``in_process``."""
    import torch

    cpus = os.cpu_count() or 1
    jobs = args.jobs if args.jobs is not None else (1 if torch.cuda.is_available() or in_process else min(2, cpus))
    threads = args.threads if args.threads is not None else max(1, cpus // max(1, jobs))
    return jobs, threads


def common_settings(args: argparse.Namespace, s: Settings) -> Settings:
    if args.seeds is not None:
        s.seeds = args.seeds
    if args.epochs is not None:
        s.epochs = args.epochs
    if args.teacher_epochs is not None:
        s.teacher_epochs = args.teacher_epochs
    if args.budget is not None:
        s.budget = args.budget
    return s


def run(args: argparse.Namespace) -> int:
    """Runs ``wsld compare``."""
    from wsld.commands.train import split_config_and_overrides
    from wsld.demo.pipeline import run_compare, settings_check

    config, overrides = split_config_and_overrides(args.args)
    if config is not None:
        config = str(Path(config).resolve())
    s = Settings(config=config, overrides=tuple(overrides))
    if args.losses:
        s.rows = tuple(k for k in ROW_BY_KEY if k in args.losses)
    common_settings(args, s)
    s.holdout, s.limit, s.search = args.holdout, args.search_limit, not args.no_search
    s.jobs, s.threads = runtime_defaults(args)
    settings_check(s)
    name = Path(config).stem if config else "defaults"
    out = Path(os.path.expanduser(args.out or f"runs/compare-{name}"))
    command = "wsld compare " + " ".join(shlex.quote(a) for a in _argv(args))
    return run_compare(s, out, command, progress=not args.no_progress)


def _argv(args: argparse.Namespace) -> list[str]:
    """The options as given, for the report."""
    parts = list(args.args)
    if args.losses:
        parts += ["--losses", *args.losses]
    for key in ("seeds", "epochs", "teacher_epochs", "budget", "out", "jobs", "threads"):
        v = getattr(args, key)
        if v is not None:
            parts += ["--" + key.replace("_", "-"), str(v)]
    if args.holdout != DEFAULT_HOLDOUT:
        parts += ["--holdout", str(args.holdout)]
    if args.search_limit != DEFAULT_LIMIT:
        parts += ["--search-limit", str(args.search_limit)]
    if args.no_search:
        parts.append("--no-search")
    return parts
