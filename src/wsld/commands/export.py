"""``wsld export``: its argument parser; the export itself is ``wsld.export``."""

from __future__ import annotations

import argparse
from pathlib import Path

from wsld.commands import one_of


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export",
        help="write a trained student as ONNX, TorchScript or safetensors (checked against PyTorch)",
        description="Export the student of a wsld checkpoint for deployment. The model takes float images "
        "normalised with the training mean/std and returns logits; mean, std, classes and input size are stored "
        "as metadata. The written file is loaded back and run on a batch of validation images, and the max "
        "absolute logit difference to PyTorch is printed (ONNX runs in onnxruntime: pip install 'wsld[onnx]'). "
        "safetensors holds weights only: evaluate it with 'wsld eval FILE --config RUN/config.yaml'.",
    )
    p.add_argument("checkpoint", help="a wsld checkpoint (a run's last.pt, best.pt or epoch_<n>.pt)")
    p.add_argument("--format", required=True, type=one_of("wsld.export", "FORMATS"), metavar="FORMAT",
                   help="onnx | torchscript | safetensors")
    p.add_argument("--out", metavar="PATH", help="output file (default: beside the checkpoint, e.g. best.onnx)")
    p.add_argument("--ema", action="store_true", help="export the EMA weights stored in the checkpoint")
    p.add_argument("--allow-import", action="store_true",
                   help="import the module that the checkpoint names for its student (package.module:callable), "
                   "running its code; without it such a checkpoint is refused")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import sys

    from wsld.export import export_student

    r = export_student(args.checkpoint, args.format, args.out, args.ema, log=lambda m: print(f"[wsld] {m}", file=sys.stderr),
                       allow_import=args.allow_import)
    print(
        f"exported {r['arch']} ({r['num_classes']} classes, input {'x'.join(map(str, r['input_shape']))}) as {r['format']} "
        f"to {r['path']} ({r['bytes'] / 2**20:.2f} MiB)\n  check on {r['check_input']}: max |logit difference| vs PyTorch "
        f"= {r['max_abs_diff']:.3g}"
    )
    if r["format"] == "safetensors":
        cfg_hint = Path(r["path"]).parent / "config.yaml"
        hint = f"wsld eval {r['path']}" + ("" if cfg_hint.is_file() else f" --config {Path(args.checkpoint).parent / 'config.yaml'}")
        print(f"  evaluate with: {hint}")
    return 0
