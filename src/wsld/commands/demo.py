"""The ``wsld demo`` argument parser: ``wsld compare`` on the built-in Fashion-MNIST with the registered pair (docs/demo.md)."""

from __future__ import annotations

import argparse
import os
import shlex
from pathlib import Path

from wsld.commands.compare import add_common, common_settings, runtime_defaults
from wsld.demo.plan import DEFAULT_ROWS, ROW_BY_KEY, Settings

# the demo's base config as overrides of the built-in defaults (Fashion-MNIST), registered in docs/demo.md
TEACHER, STUDENT = "cifar_resnet8_s2", "cnn_student"
DEMO_OVERRIDES = (
    "data.dataset=fashion-mnist", "data.format=builtin", "data.batch_size=128", "data.val_batch_size=500",
    "data.workers=0", f"model.teacher={TEACHER}", f"model.student={STUDENT}", "model.channels_last=true",
    "distill.loss=wsld", "distill.T=4.0", "train.epochs=10", "train.lr=0.1", "train.base_batch_size=256",
    "train.amp=off", "train.log_every=50", "teacher_train.epochs=10", "teacher_train.lr=0.1",
    "checkpoint.every_steps=100",
)  # fmt: skip
TRAIN_PER_CLASS = 1000  # the demo's training images per class (the first of each class); test: all 10,000
QUICK_PER_CLASS = 60  # --quick: training and test images per class
QUICK_NOTE = ("PIPELINE CHECK (--quick), NOT A COMPARISON: tiny data, 1 seed, 1 epoch; these numbers say nothing "
              "about which loss is better, and no differences are reported")  # fmt: skip


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Registers ``wsld demo``."""
    p = sub.add_parser(
        "demo",
        help="'wsld compare' on the built-in Fashion-MNIST: teacher, student alone, KD, WSLD, WSLD with weights fixed "
        "at 1, 3 seeds, with a report (--quick: a pipeline check in its own folder)",
        description=f"Runs 'wsld compare' on the built-in Fashion-MNIST ({TRAIN_PER_CLASS:,} training images per class, "
        f"the 10,000 test images) with the registered pair {TEACHER} (teacher, "
        f"its rate searched) -> {STUDENT}: rows {' '.join(DEFAULT_ROWS)} (--losses adds dkd, dist), 3 seeds, every "
        "value searched on held-out training images, report with every paired difference. Running the same command "
        "again continues where it stopped. See docs/demo.md.",
    )
    p.add_argument("--out", metavar="DIR", help="run folder (default: runs/demo, --quick: runs/demo-quick)")
    p.add_argument("--quick", action="store_true",
                   help=f"pipeline check, NOT a comparison: {QUICK_PER_CLASS} training and test images per class, 1 seed, "
                   "1 epoch, search grids of 3 points, in its own folder")
    p.add_argument("--losses", nargs="+", choices=list(ROW_BY_KEY), metavar="ROW",
                   help=f"rows among {' '.join(ROW_BY_KEY)} (default: {' '.join(DEFAULT_ROWS)})")
    p.add_argument("--data-path", metavar="DIR", help="folder with the Fashion-MNIST IDX files (default: the system location)")
    add_common(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Runs ``wsld demo`` (imported on use, so ``wsld --help`` stays fast)."""
    from wsld.demo.pipeline import run_compare, settings_check

    default_out = "runs/demo-quick" if args.quick else "runs/demo"
    out = Path(os.path.expanduser(args.out or default_out))
    overrides = list(DEMO_OVERRIDES)
    per_class, test_per_class = (QUICK_PER_CLASS, QUICK_PER_CLASS) if args.quick else (TRAIN_PER_CLASS, None)
    data = (out / "data" / f"fashion-mnist-{per_class}-{test_per_class or 'all'}").resolve()
    overrides = [o for o in overrides if not o.startswith("data.data_path=")] + [f"data.data_path={data}"]
    if args.quick:
        overrides += ["data.batch_size=32", "train.log_every=5"]
    source = str(Path(args.data_path).resolve()) if args.data_path else None

    def prepare(log) -> None:
        from wsld.demo.data import write_idx_subset

        write_idx_subset(data, {"train": ("train", 0, per_class), "val": ("val", 0, test_per_class)}, source, log)

    s = Settings(config=None, overrides=tuple(overrides))
    if args.losses:
        s.rows = tuple(k for k in ROW_BY_KEY if k in args.losses)
    if args.quick:
        s.seeds, s.epochs, s.teacher_epochs, s.limit, s.holdout = 1, 1, 1, 0, 0.2
    common_settings(args, s)
    s.jobs, s.threads = runtime_defaults(args, in_process=args.quick)
    settings_check(s)
    parts = ["wsld", "demo"] + (["--quick"] if args.quick else [])
    for key in ("out", "losses", "seeds", "epochs", "teacher_epochs", "budget", "jobs", "threads", "data_path"):
        v = getattr(args, key)
        if v is not None:
            parts += ["--" + key.replace("_", "-"), *(map(str, v) if isinstance(v, list) else [str(v)])]
    hint = (f"remove it (rm -rf {out}) or give the demo another folder (wsld demo{' --quick' if args.quick else ''} "
            f"--out runs/demo2)")
    return run_compare(s, out, " ".join(shlex.quote(p) for p in parts), progress=not args.no_progress,
                       clear_hint=hint, label="demo", quick_note=QUICK_NOTE if args.quick else None, prepare=prepare,
                       extra_meta={"equivalent": "wsld compare " + " ".join(shlex.quote(o) for o in overrides)})
