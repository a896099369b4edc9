"""``wsld eval CHECKPOINT [key=value ...]``: top-1/top-5 of a student on the val split."""

from __future__ import annotations

import argparse
import os
from pathlib import Path


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval",
        help="evaluate a student checkpoint (last.pt, best.pt or a .safetensors export) on val",
        description="Print top-1/top-5 of a trained student on the val split. The data and model come from the "
        "checkpoint's saved config (for a .safetensors file, from config.yaml beside it or --config); "
        "override any key, e.g. data.data_path=/elsewhere/imagenet.",
    )
    p.add_argument("checkpoint", help="a wsld checkpoint (.pt) or weights file (.safetensors)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    p.add_argument("--config", help="YAML config describing data and model (default: the checkpoint's own)")
    p.add_argument("--ema", action="store_true", help="evaluate the EMA weights stored in the checkpoint")
    p.add_argument("--allow-import", action="store_true",
                   help="import the module that the checkpoint (or its config) names for its student "
                   "(package.module:callable), running its code; without it such a name is refused unless given as "
                   "model.student=... on this command line")
    p.set_defaults(func=run, extra_args_dest="overrides")


def run(args: argparse.Namespace) -> int:
    from wsld.checkpoint import load_checkpoint, read_weights, refuse_unnamed_import, student_state
    from wsld.config import load_config
    from wsld.data.build import build_datasets
    from wsld.data.sampling import ResumableSampler
    from wsld.engine.evaluate import evaluate
    from wsld.engine.loop import make_loader
    from wsld.engine.step import BatchNormalizer
    from wsld.errors import UserError
    from wsld.models import build_model, check_model_name, load_weights
    from wsld.runtime import amp_dtype_for, compile_module, setup_runtime, teardown_runtime, use_channels_last

    path = Path(args.checkpoint)
    if not path.is_file() and not path.is_dir():  # a folder gets load_checkpoint's hint
        raise UserError(f"checkpoint not found: {path}")
    where = ""
    if path.suffix == ".safetensors":
        if args.ema:
            raise UserError("--ema needs a wsld checkpoint (.pt); a .safetensors file holds one set of weights")
        state = read_weights(path)
        cfg_path = Path(args.config) if args.config else path.parent / "config.yaml"
        if not cfg_path.is_file():
            raise UserError(f"{path} holds weights only: give --config CONFIG (the run's config.yaml)")
        cfg = load_config(cfg_path, args.overrides)
    else:
        ck = load_checkpoint(path)
        state = student_state(ck, path, ema=args.ema)
        if args.config:
            cfg = load_config(args.config, args.overrides)
        else:
            cfg = load_config(None, args.overrides, base=ck.get("config"))
        where = f", epoch {ck.get('epoch')}" + (f" step {ck['step_in_epoch']}" if ck.get("step_in_epoch") else "")
    named = any(o.partition("=")[0].strip() == "model.student" for o in args.overrides)
    source = args.config or (cfg_path if path.suffix == ".safetensors" else path)
    refuse_unnamed_import(cfg.model.student, source, named, args.allow_import)
    check_model_name(cfg.model.student, "model.student")
    rt = setup_runtime()
    _, val, info = build_datasets(cfg.data, seed=cfg.train.seed)
    model = build_model(
        cfg.model.student, info.num_classes, in_channels=info.in_channels, replace_head_if_needed=cfg.model.replace_head, role="student"
    )
    load_weights(model, state, str(path), cfg.model.student)
    model.to(rt.device)
    bs = max(1, (cfg.data.val_batch_size or cfg.data.batch_size) // rt.world_size)
    sampler = ResumableSampler(len(val), batch_size=bs, shuffle=False, rank=rt.rank, world_size=rt.world_size, pad=False, with_seeds=False)
    loader = make_loader(val, sampler, bs, workers=cfg.data.workers, device=rt.device, drop_last=False, seed=cfg.train.seed)
    norm = BatchNormalizer(info.mean, info.std, rt.device, use_channels_last(cfg.model.channels_last, rt.device))
    try:
        run = compile_module(model) if cfg.model.compile else model
        res = evaluate(run, loader, norm, info.num_classes, rt, amp_dtype_for(cfg.train.amp, rt.device), cfg.train.progress, "eval")
    finally:
        teardown_runtime(rt)
    if int(os.environ.get("RANK", "0")) == 0:
        which = "EMA weights" if args.ema else "student"
        print(
            f"{path} ({which}{where}): {cfg.model.student} on {cfg.data.dataset} {cfg.data.val_split} "
            f"({res['count']} images): top-1 {res['top1']:.2f}  top-5 {res['top5']:.2f}"
        )
    return 0
