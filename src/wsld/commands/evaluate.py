"""``wsld eval CHECKPOINT [key=value ...]``: top-1/top-5 of a student on the val split."""

from __future__ import annotations

import argparse
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
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from omegaconf import OmegaConf

    from wsld.checkpoint import load_checkpoint
    from wsld.config import config_from_dict, load_config, to_dict
    from wsld.data import build_datasets
    from wsld.engine import BatchNormalizer, Trainer, amp_dtype_for, evaluate, setup_runtime, use_channels_last
    from wsld.errors import CheckpointError, UserError
    from wsld.models import build_model, load_state_dict_file

    path = Path(args.checkpoint)
    if not path.is_file():
        raise UserError(f"checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        state = load_state_dict_file(path)
        cfg_path = Path(args.config) if args.config else path.parent / "config.yaml"
        if not cfg_path.is_file():
            raise UserError(f"{path} holds weights only: give --config CONFIG (the run's config.yaml)")
        cfg = load_config(cfg_path, args.overrides)
    else:
        ck = load_checkpoint(path)
        if args.ema:
            if ck.get("ema") is None:
                raise CheckpointError(f"{path} holds no EMA weights (train.ema_decay was 0)")
            state = ck["ema"]
        else:
            state = ck["student"]
        if args.config:
            cfg = load_config(args.config, args.overrides)
        else:
            base = config_from_dict(ck["config"])
            cfg = load_config(None, _dotlist(to_dict(base)) + list(args.overrides))
    rt = setup_runtime()
    _, val, info = build_datasets(cfg.data, seed=cfg.train.seed)
    model = build_model(cfg.model.student, info.num_classes, in_channels=info.in_channels, replace_head_if_needed=cfg.model.replace_head, role="student")
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise CheckpointError(f"{path} does not fit student '{cfg.model.student}': {str(e).splitlines()[0]}") from None
    model.to(rt.device)
    trainer = Trainer(cfg, Path("."), rt)
    from wsld.data.sampling import ResumableSampler

    bs = cfg.data.val_batch_size or cfg.data.batch_size
    loader = trainer._loader(val, ResumableSampler(len(val), batch_size=bs, shuffle=False, pad=False, with_seeds=False), bs, False)
    norm = BatchNormalizer(info.mean, info.std, rt.device, use_channels_last(cfg, rt.device))
    res = evaluate(model, loader, norm, info.num_classes, rt, amp_dtype_for(cfg.train.amp, rt.device), cfg.train.progress, "eval")
    print(f"{path}: {cfg.model.student} on {cfg.data.dataset} {cfg.data.val_split} ({res['count']} images): "
          f"top-1 {res['top1']:.2f}  top-5 {res['top5']:.2f}")
    return 0


def _dotlist(d: dict, prefix: str = "") -> list[str]:
    import json

    out = []
    for k, v in d.items():
        if isinstance(v, dict):
            out += _dotlist(v, f"{prefix}{k}.")
        else:
            out.append(f"{prefix}{k}={json.dumps(v) if not isinstance(v, str) else v}")
    return out
