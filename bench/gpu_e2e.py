#!/usr/bin/env python
"""End-to-end ``wsld train`` images/s and data-wait fraction for data.decode=cpu|gpu, stored soft labels, compile, fp32.

The GPU table of issue 15 (b)-(e) in one run: one generated ImageNet-shaped LMDB of real-photo
JPEGs (``--images`` unique ~500x375 photos, each present ``--replicate`` times, one class folder
per ``--classes``), one random teacher, one store of its soft labels (``wsld soft-labels
--crops 1``), then one ``wsld train`` (1 epoch) per run of ``--runs``:

  NAME=OVERRIDE[,OVERRIDE...]   e.g.  cpu-w8=data.decode=cpu,data.workers=8

with the shorthands ``stored`` (distill.soft_labels=<the store>) and ``fp32``
(train.amp=off, model.channels_last=false). Each run has its own ``--run-timeout``; a run that
fails or times out is recorded as such and the next one starts. Images/s and the data-wait
fraction come from the run's metrics.jsonl, as in bench/train_throughput.py (first window
left out); ``decode`` is what the run's start record says it used (null when the trainer does
not report it).

Writes ``OUT_DIR/gpu_e2e.json`` (the record) and prints the table.
Example (what bench/gpu_figures.sh runs):
  python bench/gpu_e2e.py --out-dir bench/results/gpu --device cuda
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_common import command_line, machine, now  # noqa: E402
from train_throughput import make_dataset, read_windows, run_wsld, summarise, write_teacher, wsld_env  # noqa: E402

DEFAULT_RUNS = (
    "cpu-w4=data.decode=cpu,data.workers=4;cpu-w8=data.decode=cpu,data.workers=8;"
    "cpu-w14=data.decode=cpu,data.workers=14;gpu-w4=data.decode=gpu,data.workers=4;"
    "gpu-w8=data.decode=gpu,data.workers=8;"
    "stored-cpu-w14=stored,data.decode=cpu,data.workers=14;stored-gpu-w4=stored,data.decode=gpu,data.workers=4;"
    "compile-gpu-w4=model.compile=true,data.decode=gpu,data.workers=4;"
    "fp32-cpu-w14=fp32,data.decode=cpu,data.workers=14;fp32-gpu-w4=fp32,data.decode=gpu,data.workers=4"
)
SHORTHANDS = {"fp32": ["train.amp=off", "model.channels_last=false"]}


def parse_runs(spec: str) -> list[tuple[str, list[str]]]:
    runs = []
    for part in [p for p in spec.split(";") if p.strip()]:
        name, _, overrides = part.partition("=")
        if not name or not overrides:
            raise ValueError(f"--runs entry '{part}' is not NAME=OVERRIDE[,OVERRIDE...]")
        runs.append((name.strip(), [o.strip() for o in overrides.split(",") if o.strip()]))
    return runs


def main(argv=None) -> int:
    doc = __doc__ or ""
    ap = argparse.ArgumentParser(description=doc.split("\n\n")[0], epilog=doc.split("\n\n", 1)[1],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    ap.add_argument("--out-dir", required=True, help="folder for gpu_e2e.json (created)")
    ap.add_argument("--images", type=int, default=1000, help="unique train JPEGs, at least --classes (default: %(default)s)")
    ap.add_argument("--replicate", type=int, default=20, help="each train JPEG appears this many times (default: %(default)s)")
    ap.add_argument("--classes", type=int, default=1000, help="class folders (default: %(default)s)")
    ap.add_argument("--image-size", type=int, default=224, help="data.image_size (default: %(default)s)")
    ap.add_argument("--batch-size", type=int, default=256, help="data.batch_size (default: %(default)s)")
    ap.add_argument("--teacher", default="resnet34", help="model.teacher (default: %(default)s)")
    ap.add_argument("--student", default="resnet18", help="model.student (default: %(default)s)")
    ap.add_argument("--log-every", type=int, default=10, help="train.log_every: steps per window (default: %(default)s)")
    ap.add_argument("--runs", default=DEFAULT_RUNS, help="';'-separated NAME=OVERRIDES (default: the issue's table)")
    ap.add_argument("--run-timeout", type=int, default=120, help="seconds per wsld run (default: %(default)s)")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cuda", help="cpu hides CUDA from wsld (default: %(default)s)")
    ap.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS for wsld (default: inherited)")
    ap.add_argument("--workdir", default=None, help="where to build data and runs (default: a temp dir, removed after)")
    args = ap.parse_args(argv)
    try:
        runs = parse_runs(args.runs)
    except ValueError as e:
        ap.error(str(e))
    if args.images < args.classes:
        ap.error("--images must be >= --classes (every class folder needs an image)")

    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda given but CUDA is not available")
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    env = wsld_env(args.device, args.threads)
    cmd = [sys.executable, "-m", "wsld"]
    tmp = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="wsld-bench-gpu-e2e-"))
    results: list[dict[str, Any]] = []
    setup: dict[str, float] = {}
    try:
        root = tmp / "photos"
        shutil.rmtree(root, ignore_errors=True)
        shutil.rmtree(root.with_name(root.name + "_unique"), ignore_errors=True)
        t0 = time.perf_counter()
        make_dataset(root, args.images, args.classes, 1, args.replicate)
        setup["generate_s"] = time.perf_counter() - t0
        for split in ("train", "val"):
            setup[f"pack_{split}_s"] = run_wsld(cmd, ["data", "pack", str(root), "--split", split, "--out", str(root / "lmdb" / split),
                                                      "--no-progress", "--overwrite"], env, tmp / f"pack_{split}.log")  # fmt: skip
        weights = tmp / "teacher.safetensors"
        write_teacher(weights, args.teacher, args.classes)
        common = [
            "data.format=lmdb", "data.dataset=synthetic-imagenet", f"data.data_path={root / 'lmdb'}",
            f"data.image_size={args.image_size}", f"data.val_resize={int(args.image_size * 8 / 7)}",
            f"data.batch_size={args.batch_size}", f"model.teacher={args.teacher}", f"model.student={args.student}",
            f"model.teacher_weights={weights}", f"model.teacher_cache={tmp / 'teacher_cache'}", "distill.loss=wsld",
            "distill.T=2", "distill.alpha=2.5", "train.epochs=1", f"train.log_every={args.log_every}",
            "train.progress=false", "train.lr=0.01", "distill.allow_weak_teacher=true",  # a random teacher: speed only
        ]  # fmt: skip
        store = tmp / "soft_labels"
        if any("stored" in o for _, o in runs):
            setup["soft_labels_s"] = run_wsld(cmd, ["soft-labels", *common, "data.workers=8", "--crops", "1", "--out", str(store)],
                                              env, tmp / "soft_labels.log")  # fmt: skip
        for name, overrides in runs:
            extra: list[str] = []
            for o in overrides:
                extra += [f"distill.soft_labels={store}"] if o == "stored" else SHORTHANDS.get(o, [o])
            run_dir = tmp / "runs" / name
            shutil.rmtree(run_dir, ignore_errors=True)
            res: dict[str, Any] = {"name": name, "overrides": extra}
            t0 = time.perf_counter()
            try:
                with open(tmp / f"{name}.log", "w") as log:
                    proc = subprocess.run([*cmd, "train", *common, *extra, "--out", str(run_dir)], stdout=log,
                                          stderr=subprocess.STDOUT, env=env, timeout=args.run_timeout)  # fmt: skip
                res["exit"] = proc.returncode
            except subprocess.TimeoutExpired:
                res["exit"] = "timeout"
            res["wall_s"] = time.perf_counter() - t0
            metrics = run_dir / "metrics.jsonl"
            if metrics.exists():
                res.update(summarise(read_windows(metrics), args.batch_size, args.log_every))
                start = next((json.loads(x) for x in metrics.read_text().splitlines() if '"start"' in x), {})
                res.update({k: start.get(k) for k in ("decode", "amp", "channels_last")})
            if res["exit"] != 0:
                res["log_tail"] = (tmp / f"{name}.log").read_text(errors="replace").splitlines()[-8:]
            results.append(res)
            ips = f"{res['img_per_s']:.0f} img/s, data wait {res['data_wait_frac']:.2f}" if res.get("windows") else "no window"
            print(f"  {name}: exit {res['exit']}, {ips} ({res['wall_s']:.0f} s)", file=sys.stderr, flush=True)
    finally:
        if not args.workdir:
            shutil.rmtree(tmp, ignore_errors=True)

    info = machine(torch.device(args.device) if args.device == "cuda" else None)
    if args.device == "cuda":
        info["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                        capture_output=True, text=True).stdout.strip()  # fmt: skip
    print(f"\n{info['device']}, torch {info['torch']}; {args.images * args.replicate} JPEGs ~500x375, {args.classes} classes, "
          f"{args.teacher} -> {args.student}, batch {args.batch_size}, {args.image_size} px")  # fmt: skip
    print(f"{'run':<18}{'decode':>8}{'img/s':>9}{'data wait':>11}   overrides")
    for r in results:
        got = f"{r['img_per_s']:>9.0f}{r['data_wait_frac']:>11.2f}" if r.get("windows") else f"{'exit ' + str(r['exit']):>20}"
        print(f"{r['name']:<18}{str(r.get('decode')):>8}{got}   {' '.join(r['overrides'])}")
    record = {"date": now(), "command": command_line("gpu_e2e.py", argv), "machine": info, "images": args.images * args.replicate,
              "classes": args.classes, "image_size": args.image_size, "batch_size": args.batch_size, "teacher": args.teacher,
              "student": args.student, "setup": setup, "runs": results}  # fmt: skip
    (out_dir / "gpu_e2e.json").write_text(json.dumps(record, indent=1) + "\n")
    print(f"\nwrote {out_dir / 'gpu_e2e.json'}")
    return 0 if all(r["exit"] == 0 for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
