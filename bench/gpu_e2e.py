#!/usr/bin/env python
"""End-to-end ``wsld train`` in its steady state, against the step limit measured in the same script run.

One generated ImageNet-shaped LMDB of real-photo JPEGs (``--images`` unique ~500x375 photos,
repeated so that one epoch is ``--warmup-steps`` + ``--timed-steps`` steps of ``--batch-size``,
one class folder per ``--classes``), one random teacher, one store of its soft labels (``wsld
soft-labels --crops 1``, only when a run uses it), then one ``wsld train`` (1 epoch) per run of ``--runs``:

  NAME=OVERRIDE[,OVERRIDE...]   e.g.  cpu-w8=data.decode=cpu,data.workers=8

with the shorthands ``stored`` (distill.soft_labels=<the store>) and ``fp32``
(train.amp=off, model.channels_last=false).

Steady state: only the metrics windows (``kind: train``, one per ``--log-every`` steps) that start
after ``--warmup-steps`` and are whole are pooled, so worker start-up and the prefetch queues
filling never count; at least ``--timed-steps`` steps are timed per run. Per run: images/s,
``data_wait_frac`` (the loop's time blocked on the loader) and, on CUDA, ``gpu_busy_frac`` (CUDA
events: the device's time inside steps over its timeline, engine/stats.py). With ``--step-json``
(what bench/step.py wrote earlier in the same bench/gpu_figures.sh run) each run's images/s is
also given as a fraction of its step limit: batch / ((a) student step + (b) teacher inference) of
the same precision (+ compile) config, or batch / (a) for stored soft labels.

Runs go in the order given, each under ``--run-timeout``, all under ``--budget-s`` (a run that
would not fit is recorded as skipped); ``OUT_DIR/gpu_e2e.json`` is rewritten after each run, so a
part stopped by its timeout keeps what it measured.
Example (what bench/gpu_figures.sh runs):
  python bench/gpu_e2e.py --out-dir bench/results/gpu --device cuda --step-json bench/results/gpu/step.json
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
from typing import Any, Optional

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_common import command_line, machine, now  # noqa: E402
from train_throughput import make_dataset, run_wsld, write_teacher, wsld_env  # noqa: E402

DEFAULT_RUNS = (  # most wanted first: a part stopped by its time budget keeps these
    "gpu-w8=data.decode=gpu,data.workers=8;gpu-w4=data.decode=gpu,data.workers=4;"
    "cpu-w14=data.decode=cpu,data.workers=14;cpu-w8=data.decode=cpu,data.workers=8;"
    "stored-gpu-w8=stored,data.decode=gpu,data.workers=8;fp32-gpu-w8=fp32,data.decode=gpu,data.workers=8;"
    "compile-gpu-w8=model.compile=true,data.decode=gpu,data.workers=8"
)
SHORTHANDS = {"fp32": ["train.amp=off", "model.channels_last=false"]}
A, B = "(a) student step (ce, no teacher)", "(b) teacher inference (no_grad)"  # bench/step.py's names


def parse_runs(spec: str) -> list[tuple[str, list[str]]]:
    runs = []
    for part in [p for p in spec.split(";") if p.strip()]:
        name, _, overrides = part.partition("=")
        if not name or not overrides:
            raise ValueError(f"--runs entry '{part}' is not NAME=OVERRIDE[,OVERRIDE...]")
        runs.append((name.strip(), [o.strip() for o in overrides.split(",") if o.strip()]))
    return runs


def steady(metrics: Path, warmup_steps: int, log_every: int, batch: int) -> dict[str, Any]:
    """Pooled images/s, data wait and GPU busy over the whole windows that start after the warm-up."""
    recs = [json.loads(x) for x in metrics.read_text().splitlines() if x.strip()]
    train = [r for r in recs if r.get("kind") == "train" and r.get("epoch") == 1]
    imgs = secs = wait = busy_s = busy_w = 0.0
    steps, prev = 0, 0
    for r in train:
        start, prev = prev, r["step"]
        if start < warmup_steps or r["step"] - start != log_every:
            continue
        dt = log_every * batch / r["img_per_s"]
        imgs, secs, wait, steps = imgs + log_every * batch, secs + dt, wait + r["data_wait_frac"] * dt, steps + log_every
        if r.get("gpu_busy_frac") is not None:
            busy_s, busy_w = busy_s + r["gpu_busy_frac"] * dt, busy_w + dt
    if not steps:
        return {"timed_steps": 0}
    return {"timed_steps": steps, "img_per_s": imgs / secs, "data_wait_frac": wait / secs,
            "gpu_busy_frac": busy_s / busy_w if busy_w else None}  # fmt: skip


def step_limits(path: Optional[str], args: argparse.Namespace) -> dict[str, dict[str, float]]:
    """config name -> {"limit": img/s of (a)+(b), "student": img/s of (a)}, from bench/step.py's records
    of the same models, batch and image size (the last record of each config wins)."""
    if not path or not Path(path).exists():
        return {}
    out: dict[str, dict[str, float]] = {}
    for rec in json.loads(Path(path).read_text()):
        if (rec.get("teacher"), rec.get("student"), rec.get("batch_size"), rec.get("image_size")) != (
            args.teacher, args.student, args.batch_size, args.image_size
        ):
            continue
        for res in rec.get("results", []):
            t = res.get("times_ms", {})
            if A in t and B in t:
                a, b = t[A]["median"], t[B]["median"]
                out[res["config"]] = {"limit": args.batch_size / ((a + b) / 1e3), "student": args.batch_size / (a / 1e3)}
    return out


def config_of(start: dict[str, Any], overrides: list[str]) -> str:
    """bench/step.py's config name for a run, from what its start record says it used."""
    amp = start.get("amp") not in (None, "None", "off")
    name = "bf16+cl" if amp and start.get("channels_last") else ("bf16" if amp else "fp32")
    return name + ("+compile" if "model.compile=true" in overrides else "")


def main(argv=None) -> int:
    doc = __doc__ or ""
    ap = argparse.ArgumentParser(description=doc.split("\n\n")[0], epilog=doc.split("\n\n", 1)[1],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    ap.add_argument("--out-dir", required=True, help="folder for gpu_e2e.json (created)")
    ap.add_argument("--images", type=int, default=1000, help="unique train JPEGs, at least --classes (default: %(default)s)")
    ap.add_argument("--classes", type=int, default=1000, help="class folders (default: %(default)s)")
    ap.add_argument("--image-size", type=int, default=224, help="data.image_size (default: %(default)s)")
    ap.add_argument("--batch-size", type=int, default=256, help="data.batch_size (default: %(default)s)")
    ap.add_argument("--teacher", default="resnet34", help="model.teacher (default: %(default)s)")
    ap.add_argument("--student", default="resnet18", help="model.student (default: %(default)s)")
    ap.add_argument("--warmup-steps", type=int, default=40, help="steps left out at the start of each run (default: %(default)s)")
    ap.add_argument("--timed-steps", type=int, default=300, help="steps timed after the warm-up (default: %(default)s)")
    ap.add_argument("--log-every", type=int, default=10, help="train.log_every: steps per window (default: %(default)s)")
    ap.add_argument("--runs", default=DEFAULT_RUNS, help="';'-separated NAME=OVERRIDES, in order (default: the issue's table)")
    ap.add_argument("--run-timeout", type=int, default=120, help="seconds per wsld run at most (default: %(default)s)")
    ap.add_argument("--budget-s", type=int, default=0, help="seconds for everything; runs that would not fit are skipped (default: none)")
    ap.add_argument("--step-json", default=None, help="bench/step.py's results of this run, for the fraction of the step limit")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cuda", help="cpu hides CUDA from wsld (default: %(default)s)")
    ap.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS for wsld (default: inherited)")
    ap.add_argument("--workdir", default=None, help="where to build data and runs (default: a temp dir, removed after)")
    args = ap.parse_args(argv)
    t_start = time.perf_counter()
    try:
        runs = parse_runs(args.runs)
    except ValueError as e:
        ap.error(str(e))
    if args.images < args.classes:
        ap.error("--images must be >= --classes (every class folder needs an image)")
    if args.timed_steps < 1 or args.warmup_steps < 0 or args.log_every < 1:
        ap.error("--timed-steps and --log-every must be >= 1, --warmup-steps >= 0")

    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda given but CUDA is not available")
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    env = wsld_env(args.device, args.threads)
    cmd = [sys.executable, "-m", "wsld"]
    tmp = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="wsld-bench-gpu-e2e-"))
    # whole windows after the warm-up, then one spare step: the epoch has at least --timed-steps timed steps
    steps = -(-args.warmup_steps // args.log_every) * args.log_every + -(-args.timed_steps // args.log_every) * args.log_every + 1
    replicate = -(-steps * args.batch_size // args.images)
    limits = step_limits(args.step_json, args)
    info = machine(torch.device(args.device) if args.device == "cuda" else None)
    if args.device == "cuda":
        info["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                        capture_output=True, text=True).stdout.strip()  # fmt: skip
    results: list[dict[str, Any]] = []
    setup: dict[str, float] = {}
    record = {"date": now(), "command": command_line("gpu_e2e.py", argv), "machine": info, "images": args.images * replicate,
              "unique_images": args.images, "classes": args.classes, "image_size": args.image_size, "batch_size": args.batch_size,
              "teacher": args.teacher, "student": args.student, "warmup_steps": args.warmup_steps, "log_every": args.log_every,
              "step_limits": limits, "setup": setup, "runs": results}  # fmt: skip

    def save() -> None:
        (out_dir / "gpu_e2e.json").write_text(json.dumps(record, indent=1) + "\n")

    try:
        root = tmp / "photos"
        shutil.rmtree(root, ignore_errors=True)
        shutil.rmtree(root.with_name(root.name + "_unique"), ignore_errors=True)
        t0 = time.perf_counter()
        make_dataset(root, args.images, args.classes, 1, replicate)
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
        save()
        for name, overrides in runs:
            extra: list[str] = []
            for o in overrides:
                extra += [f"distill.soft_labels={store}"] if o == "stored" else SHORTHANDS.get(o, [o])
            res: dict[str, Any] = {"name": name, "overrides": extra}
            results.append(res)
            limit = args.run_timeout
            if args.budget_s:
                limit = min(limit, int(args.budget_s - (time.perf_counter() - t_start)))
                if limit < 20:
                    res["exit"] = "skipped: time budget spent"
                    save()
                    continue
            run_dir = tmp / "runs" / name
            shutil.rmtree(run_dir, ignore_errors=True)
            t0 = time.perf_counter()
            try:
                with open(tmp / f"{name}.log", "w") as log:
                    proc = subprocess.run([*cmd, "train", *common, *extra, "--out", str(run_dir)], stdout=log,
                                          stderr=subprocess.STDOUT, env=env, timeout=limit)  # fmt: skip
                res["exit"] = proc.returncode
            except subprocess.TimeoutExpired:
                res["exit"] = "timeout"
            res["wall_s"] = time.perf_counter() - t0
            metrics = run_dir / "metrics.jsonl"
            if metrics.exists():
                res.update(steady(metrics, args.warmup_steps, args.log_every, args.batch_size))
                start = next((json.loads(x) for x in metrics.read_text().splitlines() if '"start"' in x), {})
                res.update({k: start.get(k) for k in ("decode", "amp", "channels_last")})
                res["config"] = config_of(start, extra)
                lim = limits.get(res["config"])
                if lim and res.get("img_per_s"):
                    ref = "student" if any(o.startswith("distill.soft_labels=") for o in extra) else "limit"
                    res["step_limit_img_per_s"] = lim[ref]
                    res["of_step_limit"] = res["img_per_s"] / lim[ref]
            if res["exit"] != 0:
                res["log_tail"] = (tmp / f"{name}.log").read_text(errors="replace").splitlines()[-8:]
            save()
            got = (f"{res['img_per_s']:.0f} img/s over {res['timed_steps']} steps, data wait {res['data_wait_frac']:.2f}"
                   if res.get("timed_steps") else "no steady-state window")  # fmt: skip
            print(f"  {name}: exit {res['exit']}, {got} ({res['wall_s']:.0f} s)", file=sys.stderr, flush=True)
    finally:
        if not args.workdir:
            shutil.rmtree(tmp, ignore_errors=True)
        save()

    print(f"\n{info['device']}, torch {info['torch']}; {args.images * replicate} JPEGs ~500x375 ({args.images} unique), "
          f"{args.classes} classes, {args.teacher} -> {args.student}, batch {args.batch_size}, {args.image_size} px; "
          f"steady state: steps {args.warmup_steps}+, windows of {args.log_every}")  # fmt: skip
    print(f"{'run':<17}{'decode':>7}{'config':>16}{'img/s':>8}{'of limit':>10}{'data wait':>11}{'GPU busy':>10}{'steps':>7}")
    for r in results:
        if r.get("timed_steps"):
            of = f"{r['of_step_limit']:.0%}" if r.get("of_step_limit") else "n/a"
            busy = f"{r['gpu_busy_frac']:.2f}" if r.get("gpu_busy_frac") is not None else "n/a"
            got = f"{r['img_per_s']:>8.0f}{of:>10}{r['data_wait_frac']:>11.2f}{busy:>10}{r['timed_steps']:>7}"
        else:
            got = f"{'exit ' + str(r.get('exit')):>46}"
        print(f"{r['name']:<17}{str(r.get('decode')):>7}{str(r.get('config')):>16}{got}")
    print(f"\nwrote {out_dir / 'gpu_e2e.json'}")
    return 0 if all(r.get("exit") == 0 for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
