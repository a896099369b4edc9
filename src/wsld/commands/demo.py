"""The ``wsld demo`` argument parser (the demo itself lives in ``wsld.demo``)."""

from __future__ import annotations

import argparse

from wsld.demo.plan import FULL, QUICK, VARIANTS


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



def run(args: argparse.Namespace) -> int:
    """Runs ``wsld demo`` (imported on use, so ``wsld --help`` stays fast)."""
    from wsld.demo.pipeline import run as run_demo

    return run_demo(args)
