"""The ``wsld demo`` argument parser (the demo itself lives in ``wsld.demo``)."""

from __future__ import annotations

import argparse

from wsld.demo.plan import ALWAYS_ROWS, DEFAULT_ROWS, QUICK, REGIMES, ROW_BY_KEY, STUDENT, TEACHER, Settings


def _positive_int(text: str) -> int:
    """argparse type: a whole number (ranges are checked with one-line errors later)."""
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got '{text}'") from None


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Registers ``wsld demo``."""
    full = Settings()
    p = sub.add_parser(
        "demo",
        help="the reference comparison (teacher / student alone / KD / WSLD / WSLD with weights fixed at 1) on "
        "Fashion-MNIST, three regimes, 3 seeds, with a report",
        description=f"Train the CIFAR-ResNet pair {TEACHER} -> {STUDENT} on the built-in Fashion-MNIST in three "
        "regimes (balanced, long-tailed ratio 100, small data 600 per class): each regime's teacher once, its soft "
        "labels stored per seed, one search (lr, and T for the distilled rows, 4 runs per row) on held-out training "
        "images, then the rows (CE, KD, WSLD and WSLD with weights fixed at 1; --losses picks others, DKD and DIST "
        "among them) over several seeds, all with 'wsld train'; writes "
        "OUT/report.md (paired differences with 95% CIs), OUT/results.json, PNG plots, and the config of every "
        "run in OUT/configs/. Running the same command again reuses finished runs and resumes unfinished ones. "
        "See docs/demo.md.",
    )
    p.add_argument("--out", default="runs/demo", metavar="DIR", help="output folder (default: %(default)s)")
    p.add_argument("--seeds", type=_positive_int, metavar="N", help=f"seeds per row (default {full.seeds}, --quick {QUICK['seeds']})")
    p.add_argument("--quick", action="store_true",
                   help="pipeline check in about 3 minutes, NOT a comparison: every step on "
                   f"{QUICK['train_per_class']} training images per class, {QUICK['seeds']} seed, 1 epoch")
    p.add_argument("--regimes", nargs="+", choices=list(REGIMES), metavar="R",
                   help="balanced, long-tail and/or small-data (default: all three)")
    p.add_argument("--losses", nargs="+", choices=list(ROW_BY_KEY), metavar="ROW",
                   help=f"the rows to train, among {' '.join(ROW_BY_KEY)} (default: {' '.join(DEFAULT_ROWS)}); "
                   f"{' and '.join(ALWAYS_ROWS)} always run, added when not given (every paired difference is WSLD "
                   "minus another row, and the teacher's gap is measured against ce); dkd and dist use their published "
                   "values (docs/demo.md)")
    p.add_argument("--epochs", type=_positive_int, metavar="E",
                   help="student epochs of every regime and the search (default per regime: "
                   + ", ".join(f"{r} {e}" for r, e in full.epochs.items()) + ")")
    p.add_argument("--teacher-epochs", type=_positive_int, metavar="E",
                   help="teacher epochs of every regime (default per regime: "
                   + ", ".join(f"{r} {e}" for r, e in full.teacher_epochs.items()) + ")")
    p.add_argument("--jobs", type=_positive_int, metavar="N",
                   help="runs at a time, each a 'wsld' process (default: 2 on a CPU machine with 2+ cores, 1 with "
                   "CUDA; 1 runs them one by one in this process)")
    p.add_argument("--threads", type=_positive_int, metavar="T", help="torch threads per run (default: CPU cores / jobs)")
    p.add_argument("--batch-size", type=_positive_int, default=128, metavar="B", help="batch size of every run (default: %(default)s)")
    p.add_argument("--limit-per-class", type=_positive_int, metavar="N",
                   help="use only the first N training and N test images of each class (for tests and smoke checks)")
    p.add_argument("--data-path", metavar="DIR", help="folder with the Fashion-MNIST IDX files (default: the system location)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Runs ``wsld demo`` (imported on use, so ``wsld --help`` stays fast)."""
    from wsld.demo.pipeline import run as run_demo

    return run_demo(args)
