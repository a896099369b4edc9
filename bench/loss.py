#!/usr/bin/env python
"""Cost of the distillation loss alone: forward + backward of ``wsld`` (and ``kd``, ``ce``) on logits.

Times, interleaved round by round, ``loss, parts = DistillLoss(name)(student_logits, teacher_logits,
target); loss.backward()`` (the registry's loss, exactly as ``train_step`` calls it) on random
logits that require grad, and reports:

1. the absolute cost at ``--batch-size`` x ``--classes`` (default 256 x 1000, ImageNet's batch);
2. the loss as a fraction of the training step it belongs to: the loss is timed again at the
   step's own batch and class count and divided by that step's median time (the ``wsld`` step
   (c) from the latest bench/step.py record for this device type in ``--step-json``, one
   fraction per recorded configuration, with bf16 logits where that configuration used bf16
   autocast), or by ``--step-ms`` for a step timed elsewhere. Target: < 1% of the step.

Prints a table and appends the results to bench/results/loss.json.
Examples:
  python bench/loss.py --threads 1                       # after bench/step.py on this machine
  python bench/loss.py --step-ms 80 --step-batch 256     # against a step time measured elsewhere
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, Optional

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from bench_common import RESULTS, append_result, command_line, machine, now, setup_device, stats  # noqa: E402
from wsld.losses.registry import DistillLoss  # noqa: E402

LOSS_ARGS = {"wsld": {"T": 2.0, "alpha": 2.5}, "kd": {"T": 4.0, "alpha": 0.9}, "ce": {}}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def time_losses(losses: list[str], n: int, c: int, dtype: torch.dtype, dev: torch.device, iters: int, warmup: int) -> dict[str, dict]:
    """Median (min-max) ms of forward + backward for each loss on n x c logits of ``dtype``."""
    g = torch.Generator(device="cpu").manual_seed(0)
    # logits of ImageNet-like spread; the student's are a leaf that needs a gradient, as after the fc layer
    s = (3 * torch.randn(n, c, generator=g)).to(dev, dtype).requires_grad_(True)
    t = (3 * torch.randn(n, c, generator=g)).to(dev, dtype)
    y = torch.randint(0, c, (n,), generator=g).to(dev)
    fns = {name: DistillLoss(name, **LOSS_ARGS[name]) for name in losses}

    def run(name: str) -> None:
        s.grad = None
        loss, _ = fns[name](s, t, y)
        loss.backward()

    for _ in range(warmup):
        for name in losses:
            run(name)
    sync(dev)
    times: dict[str, list[float]] = {name: [] for name in losses}
    for r in range(iters):
        order = losses[r % len(losses) :] + losses[: r % len(losses)]
        for name in order:
            sync(dev)
            t0 = time.perf_counter()
            run(name)
            sync(dev)
            times[name].append((time.perf_counter() - t0) * 1e3)
    return {name: stats(v) for name, v in times.items()}


def latest_step_record(path: Path, dev: torch.device) -> Optional[dict]:
    if not path.exists():
        return None
    records = [r for r in json.loads(path.read_text()) if r.get("device_type") == dev.type]
    if dev.type == "cuda":
        name = torch.cuda.get_device_name(dev)
        same = [r for r in records if r.get("machine", {}).get("device") == name]
        records = same or records
    return records[-1] if records else None


def main(argv=None) -> int:
    doc = __doc__ or ""
    ap = argparse.ArgumentParser(description=doc.split("\n\n")[0], epilog=doc.split("\n\n", 1)[1],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    ap.add_argument("--batch-size", type=int, default=256, help="rows of the logits (default: %(default)s)")
    ap.add_argument("--classes", type=int, default=1000, help="columns of the logits (default: %(default)s)")
    ap.add_argument("--losses", default="wsld,kd,ce", help="comma-separated losses (default: %(default)s)")
    ap.add_argument("--dtypes", default=None, help="logits dtypes, comma-separated: float32, bfloat16 (default: float32 on CPU, float32,bfloat16 on CUDA)")
    ap.add_argument("--iters", type=int, default=50, help="timed rounds (default: %(default)s)")
    ap.add_argument("--warmup", type=int, default=5, help="untimed rounds first (default: %(default)s)")
    ap.add_argument("--step-json", default=str(RESULTS / "step.json"), help="bench/step.py results to read the step time from (default: %(default)s)")
    ap.add_argument("--step-ms", type=float, default=None, help="a step time (ms) measured elsewhere, instead of --step-json")
    ap.add_argument("--step-batch", type=int, default=None, help="with --step-ms: that step's batch size (default: --batch-size)")
    ap.add_argument("--step-classes", type=int, default=None, help="with --step-ms: that step's class count (default: --classes)")
    ap.add_argument("--step-dtype", choices=list(DTYPES), default="float32", help="with --step-ms: the step's logits dtype (default: %(default)s)")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    ap.add_argument("--device", default=None, help="cpu or cuda[:N] (default: cuda if available, else cpu)")
    ap.add_argument("--out", default=str(RESULTS / "loss.json"), help="JSON file the results are appended to (default: %(default)s)")
    ap.add_argument("--no-save", action="store_true", help="print only, append nothing")
    args = ap.parse_args(argv)

    dev = setup_device(ap, args.device, args.threads)
    losses = [s for s in args.losses.split(",") if s]
    for name in losses:
        if name not in LOSS_ARGS:
            ap.error(f"--losses: unknown loss '{name}' (choose from {', '.join(LOSS_ARGS)})")
    dtypes = [d for d in (args.dtypes or ("float32,bfloat16" if dev.type == "cuda" else "float32")).split(",") if d]
    for d in dtypes:
        if d not in DTYPES:
            ap.error(f"--dtypes: unknown dtype '{d}' (choose from {', '.join(DTYPES)})")

    # the steps to compare against: (label, batch, classes, logits dtype, step ms, where from)
    steps: list[dict[str, Any]] = []
    if args.step_ms is not None:
        steps.append({"config": "given", "batch": args.step_batch or args.batch_size, "classes": args.step_classes or args.classes,
                      "dtype": args.step_dtype, "step_ms": args.step_ms, "source": "--step-ms"})  # fmt: skip
    else:
        rec = latest_step_record(Path(args.step_json), dev)
        if rec is None:
            print(f"loss.py: no {dev.type} record in {args.step_json}: run bench/step.py first or give --step-ms "
                  "(absolute loss times only)", file=sys.stderr)  # fmt: skip
        else:
            for res in rec["results"]:
                wsld_step = res["times_ms"].get("(c) wsld step")
                if wsld_step is None:
                    continue
                steps.append({
                    "config": res["config"], "batch": rec["batch_size"], "classes": rec["classes"],
                    "dtype": "bfloat16" if res["amp"] == "bf16" else "float32", "step_ms": wsld_step["median"],
                    "step_ms_min": wsld_step["min"], "step_ms_max": wsld_step["max"],
                    "source": f"{args.step_json} record of {rec['date']} ({rec['command']}): {rec['teacher']} -> "
                              f"{rec['student']} at {rec['image_size']} px",
                })  # fmt: skip

    info = machine(dev)
    print(f"{info['device']} ({info['host']}), torch {info['torch']}, {info['torch_threads']} threads, load average {info['load_average_1min']}")
    absolute = {}
    for d in dtypes:
        absolute[d] = time_losses(losses, args.batch_size, args.classes, DTYPES[d], dev, args.iters, args.warmup)
        kd_med = absolute[d]["kd"]["median"] if "kd" in absolute[d] else None
        print(f"\nloss forward + backward alone, {args.batch_size} x {args.classes} {d} logits, {args.iters} rounds")
        print(f"{'loss':<8}{'median ms':>11}{'min ms':>10}{'max ms':>10}{'vs kd':>8}")
        for name, t in absolute[d].items():
            vs = f"{t['median'] / kd_med:.2f}x" if kd_med else ""
            print(f"{name:<8}{t['median']:>11.3f}{t['min']:>10.3f}{t['max']:>10.3f}{vs:>8}")

    fractions = []
    for st in steps:
        same_shape = (st["batch"], st["classes"]) == (args.batch_size, args.classes) and st["dtype"] in absolute
        lt = absolute[st["dtype"]] if same_shape else time_losses(losses, st["batch"], st["classes"], DTYPES[st["dtype"]], dev, args.iters, args.warmup)
        fr = {name: lt[name]["median"] / st["step_ms"] for name in losses}
        fractions.append({**st, "loss_ms": lt, "fraction_of_step": fr})
        print(f"\nas a share of the wsld step (config {st['config']}, batch {st['batch']} x {st['classes']} classes, "
              f"{st['dtype']} logits; step median {st['step_ms']:.2f} ms from {st['source']})")  # fmt: skip
        print(f"{'loss':<8}{'loss ms at that batch':>22}{'share of step':>15}{'target':>9}")
        for name in losses:
            target = "< 1%" if name == "wsld" else ""
            print(f"{name:<8}{lt[name]['median']:>22.3f}{100 * fr[name]:>14.3f}%{target:>9}")

    record = {
        "date": now(), "command": command_line("loss.py", argv), "machine": info, "device_type": dev.type,
        "batch_size": args.batch_size, "classes": args.classes, "iters": args.iters, "absolute_ms": absolute,
        "vs_step": fractions,
    }  # fmt: skip
    if not args.no_save:
        print(f"\nappended to {append_result(args.out, record)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
