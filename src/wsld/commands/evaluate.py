"""``wsld eval CHECKPOINT [key=value ...]``: top-1/top-5 of a student on the val split."""

from __future__ import annotations

import argparse
import os
import sys
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
    p.add_argument("--allow-data-change", action="store_true",
                   help="evaluate even when the data differs from the data the checkpoint was trained on (another class "
                   "list, or val images added, removed or changed); without it such data is refused with one line saying "
                   "what differs")
    p.set_defaults(func=run, extra_args_dest="overrides")


def run(args: argparse.Namespace) -> int:
    from wsld.checkpoint import load_checkpoint, read_weights, refuse_unnamed_import, student_state
    from wsld.config import load_config
    from wsld.data.build import build_datasets
    from wsld.data.sampling import ResumableSampler
    from wsld.engine.evaluate import evaluate
    from wsld.engine.loaders import make_loader
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
        recorded = _run_record_beside(path)
    else:
        ck = load_checkpoint(path)
        state = student_state(ck, path, ema=args.ema)
        if args.config:
            cfg = load_config(args.config, args.overrides)
        else:
            cfg = load_config(None, args.overrides, base=ck.get("config"))
        where = f", epoch {ck.get('epoch')}" + (f" step {ck['step_in_epoch']}" if ck.get("step_in_epoch") else "")
        recorded = {"classes": ck.get("classes"), "data": ck.get("data_identity"), "config": ck.get("config")}
    named = any(o.partition("=")[0].strip() == "model.student" for o in args.overrides)
    source = args.config or (cfg_path if path.suffix == ".safetensors" else path)
    refuse_unnamed_import(cfg.model.student, source, named, args.allow_import)
    check_model_name(cfg.model.student, "model.student")
    rt = setup_runtime()
    _, val, info = build_datasets(cfg.data, seed=cfg.train.seed)
    check_eval_data(recorded, cfg, val, path, args.allow_data_change)
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


def _run_record_beside(weights: Path) -> dict:
    """What the run folder of a ``.safetensors`` file records of its data (nothing outside one)."""
    import yaml

    from wsld.engine.resume import read_run_record

    rec = read_run_record(weights.parent) or {}
    try:
        config = yaml.safe_load((weights.parent / "config.yaml").read_text(encoding="utf-8"))
    except (OSError, ValueError, yaml.YAMLError):
        config = None
    return {"data": rec.get("data"), "config": config if isinstance(config, dict) else None}


# data keys that only say where the files are or how fast they are read: the val split stays the run's
_LOCATION_KEYS = {"data_path", "workers", "val_batch_size", "fast_decode", "decode"}


def check_eval_data(recorded: dict, cfg, val, path: Path, allow: bool) -> None:
    """The model's class list must be the data's (a renamed or reordered class shifts every label), and
    when the data keys name the run's own val split, its images must be the run's: refused with one line
    saying what differs (F4), unless --allow-data-change."""
    from wsld.config import to_dict
    from wsld.data.identity import FORMAT, check_identity, recorded_identity, split_identity

    was = recorded_identity(recorded)
    if not was or not was.get("classes"):
        return  # nothing recorded (a bare weights file)
    run_data = (recorded.get("config") or {}).get("data") or {}
    now_data = to_dict(cfg)["data"]
    same_split = bool(run_data) and all(run_data[k] == v for k, v in now_data.items() if k not in _LOCATION_KEYS and k in run_data)
    now = {"format": FORMAT, "classes": list(val.classes)}
    if same_split and "val" in was:
        now["val"] = split_identity(val)
    say = lambda msg: print(f"[wsld] note: {msg}", file=sys.stderr)  # noqa: E731
    check_identity(was, now, splits=("val",) if "val" in now else (), allow=allow, say=say, subject=f"evaluating {path}",
                   refusal=f"{path} was trained and evaluated on other data: {{diff}}; give data.data_path= its data")  # fmt: skip

