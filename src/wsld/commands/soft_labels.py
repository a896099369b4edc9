"""``wsld soft-labels [CONFIG] [key=value ...] --crops K [--topk k] [--precision P] [--out PATH] [--batch-size N]``."""

from __future__ import annotations

import argparse
from pathlib import Path

from wsld.commands import one_of
from wsld.errors import UserError


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "soft-labels",
        help="store the teacher's outputs on K replayable training crops per image (train with distill.soft_labels=PATH)",
        description="Run the teacher once on K training crops of every training image (drawn with the training "
        "augmentation's own seeds) and store per crop the box, the flip bit, the top-k log-probabilities (float16 by "
        "default) and the log-sum-exps that make the true class's probability, the WSLD weight and the total mass of "
        "the stored and of the unstored classes exact, in an LMDB. With --topk equal to the number of classes and "
        "--precision float32 the rebuilt logits equal the teacher's to float32 rounding, however confident it is. "
        "Training with distill.soft_labels=PATH then replays crop (epoch mod K) and needs no teacher model. "
        "Resumable: run the same command again to finish an interrupted store. Uses the same CONFIG and key=value "
        "overrides as 'wsld train'; data.workers loader processes decode in parallel; under 'torchrun "
        "--nproc_per_node=N' the N processes share the images and write the same store as one process.",
    )
    p.add_argument("args", nargs="*", metavar="[CONFIG] [key=value ...]", help="YAML config file, then dotted overrides")
    p.add_argument("--crops", type=int, required=True, metavar="K", help="crops per image (training epoch e replays crop e mod K)")
    p.add_argument("--topk", type=int, default=10, metavar="k",
                   help="teacher classes stored per crop (default 10; = classes with --precision float32: exact logits)")
    p.add_argument("--precision", type=one_of("wsld.soft_labels.store", "PRECISIONS"), default="float16",
                   metavar="P", help="float16 | float32: of the stored log-probabilities (default float16)")
    p.add_argument("--out", metavar="PATH", help="store folder (default: beside the training data, DATA_PATH/<split>_soft_labels_...)")
    p.add_argument("--batch-size", type=int, metavar="N", help="crops per teacher forward, per process (default data.batch_size)")
    p.set_defaults(func=run, extra_args_dest="args")


def run(args: argparse.Namespace) -> int:
    from wsld.commands.train import split_config_and_overrides
    from wsld.config import load_config
    from wsld.runtime import setup_runtime, teardown_runtime
    from wsld.soft_labels.generate import default_store_path, human_size, make_soft_labels

    config_path, overrides = split_config_and_overrides(args.args)
    cfg = load_config(config_path, overrides)
    if args.batch_size is not None and args.batch_size < 1:
        raise UserError(f"--batch-size must be >= 1, got {args.batch_size}")
    out = Path(args.out) if args.out else default_store_path(cfg, args.crops, args.topk)
    rt = setup_runtime()
    try:
        s = make_soft_labels(cfg, out, args.crops, args.topk, args.precision, args.batch_size, rt=rt)
    finally:
        teardown_runtime(rt)
    if s is None:  # not rank 0: rank 0 reports
        return 0
    print(
        f"soft labels: {s['images']} images ({s['new_images']} new) x {s['crops']} crops, top-{s['topk']} {s['precision']} "
        f"in {s['path']}\n  size: {human_size(s['record_bytes_per_image'])} of records per image, "
        f"{human_size(s['file_bytes_per_image'])} per image on disk, {human_size(s['file_bytes'])} total"
        + (f"\n  {s['unreadable']} unreadable images stored without crops" if s["unreadable"] else "")
        + f"\n  train with: distill.soft_labels={s['path']}"
    )
    return 0
