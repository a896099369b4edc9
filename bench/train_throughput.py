#!/usr/bin/env python
"""End-to-end training throughput of ``wsld train`` on a generated ImageNet-shaped LMDB.

What a user runs, measured from the outside: the script makes ``--images`` real-photo JPEGs (crops
of scikit-learn's two sample photos, about 500x375 like an ImageNet image, quality 90) in
``--classes`` class folders, packs them with ``wsld data pack``, writes a randomly initialised
teacher to a safetensors file (throughput does not depend on the teacher's accuracy), then runs
``wsld train`` (the real CLI, one subprocess per run: data.format=lmdb, RandomResizedCrop + flip
in the DataLoader workers, the engine's step) for every model pair x configuration x worker count.

Each run's images/s and data-wait fraction come from its own metrics.jsonl (``kind: train``
records, one per ``train.log_every`` steps: ``img_per_s`` and ``data_wait_frac``, the share of
wall time the loop spent waiting for the next batch). The first window of every epoch (worker
start-up, first batches) is left out; the rest are pooled (images / seconds) and also shown as
median (min-max) over windows. A data-wait fraction near 0 means compute-bound (more workers do
not help); near 1 means data-bound (the loader cannot keep up). The table's last column says
"data" above 0.5, "compute" below 0.2, "mixed" between.

Configurations (``--configs``): ``default`` = the engine's defaults on the device (on CUDA: bf16
autocast and channels_last); ``fp32`` = train.amp=off model.channels_last=false. Default:
``default`` on CPU, ``default,fp32`` on CUDA.

Prints a table and appends the results to bench/results/train_throughput.json.
Examples:
  python bench/train_throughput.py --threads 1                        # 2-core CPU: 640 JPEGs, 32 px
  python bench/train_throughput.py --device cuda --images 512 --replicate 12 --classes 100 \\
      --image-size 224 --batch-size 256 --pairs resnet34:resnet18 --workers 0,4,8,12
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_common import RESULTS, append_result, command_line, machine, now  # noqa: E402

CONFIGS = {"default": [], "fp32": ["train.amp=off", "model.channels_last=false"]}


def wsld_env(device: str, threads: int | None) -> dict[str, str]:
    env = dict(os.environ)
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)  # torch's intra-op threads in the wsld processes
    env["PYTHONPATH"] = str(REPO / "src") + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.pop("WSLD_STOP_AFTER_STEPS", None)
    if device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""  # wsld train picks CUDA whenever it sees one
    return env


def run_wsld(cmd: list[str], args: list[str], env: dict[str, str], log_path: Path) -> float:
    """Run ``wsld <args>``; on failure print its log tail and stop. Returns the wall seconds."""
    t0 = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.run([*cmd, *args], stdout=log, stderr=subprocess.STDOUT, env=env)
    dt = time.perf_counter() - t0
    if proc.returncode != 0:
        tail = log_path.read_text(errors="replace").splitlines()[-15:]
        raise SystemExit(f"train_throughput.py: 'wsld {' '.join(args[:2])} ...' failed (exit {proc.returncode}):\n" + "\n".join(tail))
    return dt


def make_dataset(root: Path, images: int, classes: int, val_per_class: int, replicate: int) -> None:
    """``root/train/cNN/*.JPEG`` (+ a small val split): photo crops, as bench/data_pipeline.py makes
    them; with ``replicate`` > 1 every train file also appears that many times (hard links: the
    same bytes, decoded again each time, so a big epoch costs no generation time)."""
    from data_pipeline import make_photos, replicate as link_copies

    src = root.with_name(root.name + "_unique") if replicate > 1 else root
    make_photos(src, images, classes=classes)
    for c in range(classes):  # make_photos puts one val image per class; add a few more
        files = sorted((src / "train" / f"c{c:02d}").iterdir())
        for k, f in enumerate(files[1:val_per_class]):
            shutil.copy(f, src / "val" / f"c{c:02d}" / f"v{k}.JPEG")
    if replicate > 1:
        link_copies(src, root, replicate)


def write_teacher(path: Path, name: str, classes: int) -> None:
    import torch
    from safetensors.torch import save_file

    from wsld.models import build_model

    torch.manual_seed(0)
    model = build_model(name, classes, in_channels=3, role="teacher")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))


def read_windows(metrics: Path) -> list[dict[str, Any]]:
    """Steady-state ``kind: train`` windows: all but the first of each epoch."""
    recs = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    train = [r for r in recs if r.get("kind") == "train"]
    out, seen = [], set()
    for r in train:
        if r["epoch"] not in seen:
            seen.add(r["epoch"])
            continue
        out.append(r)
    return out


def summarise(windows: list[dict[str, Any]], batch: int, log_every: int) -> dict[str, Any]:
    if not windows:
        return {"windows": 0}
    imgs, secs, wait = 0.0, 0.0, 0.0
    prev_step: dict[int, int] = {}
    for r in windows:
        # images in the window: steps since the previous record of that epoch (the last one may be short)
        steps = r["step"] - prev_step.get(r["epoch"], r["step"] - log_every)
        prev_step[r["epoch"]] = r["step"]
        n = steps * batch
        dt = n / r["img_per_s"]
        imgs, secs, wait = imgs + n, secs + dt, wait + r["data_wait_frac"] * dt
    ips = [r["img_per_s"] for r in windows]
    dw = [r["data_wait_frac"] for r in windows]
    return {
        "windows": len(windows), "images": int(imgs), "seconds": secs,
        "img_per_s": imgs / secs, "data_wait_frac": wait / secs,
        "img_per_s_windows": {"median": statistics.median(ips), "min": min(ips), "max": max(ips)},
        "data_wait_frac_windows": {"median": statistics.median(dw), "min": min(dw), "max": max(dw)},
    }  # fmt: skip


def main(argv=None) -> int:
    doc = __doc__ or ""
    ap = argparse.ArgumentParser(description=doc.split("\n\n")[0], epilog=doc.split("\n\n", 1)[1],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    ap.add_argument("--images", type=int, default=640, help="training JPEGs to generate (default: %(default)s)")
    ap.add_argument("--replicate", type=int, default=1, help="each generated train JPEG appears this many times (default: %(default)s)")
    ap.add_argument("--classes", type=int, default=10, help="class folders (default: %(default)s)")
    ap.add_argument("--val-per-class", type=int, default=2, help="val images per class (default: %(default)s)")
    ap.add_argument("--image-size", type=int, default=32, help="train crop size, data.image_size (default: %(default)s)")
    ap.add_argument("--batch-size", type=int, default=32, help="data.batch_size (default: %(default)s)")
    ap.add_argument("--pairs", default="cnn_teacher:cnn_student,resnet34:resnet18",
                    help="comma-separated TEACHER:STUDENT model pairs (default: %(default)s)")
    ap.add_argument("--workers", default="0,1,2", help="comma-separated data.workers values (default: %(default)s)")
    ap.add_argument("--configs", default=None, help=f"comma-separated, from {', '.join(CONFIGS)} (default: default on CPU, default,fp32 on CUDA)")
    ap.add_argument("--loss", default="wsld", choices=["wsld", "kd", "ce"], help="distill.loss (default: %(default)s)")
    ap.add_argument("--epochs", type=int, default=1, help="train.epochs (default: %(default)s)")
    ap.add_argument("--log-every", type=int, default=2, help="train.log_every: steps per measured window (default: %(default)s)")
    ap.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="cpu hides CUDA from wsld train (default: %(default)s)")
    ap.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS for wsld train (default: inherited / torch's choice)")
    ap.add_argument("--wsld", default=None, help="command that runs the wsld CLI (default: this Python with -m wsld)")
    ap.add_argument("--workdir", default=None, help="where to build the data and runs (default: a temp dir, removed after)")
    ap.add_argument("--out", default=str(RESULTS / "train_throughput.json"), help="JSON file the results are appended to (default: %(default)s)")
    ap.add_argument("--no-save", action="store_true", help="print only, append nothing")
    args = ap.parse_args(argv)

    import torch

    cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    if cuda and not torch.cuda.is_available():
        ap.error("--device cuda given but CUDA is not available")
    device = "cuda" if cuda else "cpu"
    pairs = []
    for p in args.pairs.split(","):
        if p.count(":") != 1:
            ap.error(f"--pairs entry '{p}' is not TEACHER:STUDENT")
        pairs.append(tuple(p.split(":")))
    try:
        workers = [int(w) for w in args.workers.split(",")]
    except ValueError:
        ap.error(f"--workers '{args.workers}' is not a comma-separated list of integers")
    configs = (args.configs or ("default,fp32" if cuda else "default")).split(",")
    for c in configs:
        if c not in CONFIGS:
            ap.error(f"--configs: unknown configuration '{c}' (choose from {', '.join(CONFIGS)})")
    n_train = args.images * max(1, args.replicate)
    if n_train < args.batch_size * (args.log_every + 1):
        ap.error(f"--images {n_train} gives fewer than {args.log_every + 1} windows of {args.log_every} steps: "
                 f"use at least {args.batch_size * (2 * args.log_every)} images or a smaller --batch-size")  # fmt: skip
    cmd = args.wsld.split() if args.wsld else [sys.executable, "-m", "wsld"]
    env = wsld_env(device, args.threads)

    tmp = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="wsld-bench-train-"))
    results = []
    try:
        root = tmp / "photos"
        if root.exists():
            shutil.rmtree(root)
        t0 = time.perf_counter()
        make_dataset(root, args.images, args.classes, args.val_per_class, args.replicate)
        gen_s = time.perf_counter() - t0
        pack_s = {}
        for split in ("train", "val"):
            pack_s[split] = run_wsld(cmd, ["data", "pack", str(root), "--split", split, "--out", str(root / "lmdb" / split),
                                           "--no-progress", "--overwrite"], env, tmp / f"pack_{split}.log")  # fmt: skip
        print(f"made {n_train} train JPEGs in {args.classes} classes ({gen_s:.1f} s), packed with wsld data pack "
              f"({pack_s['train']:.1f} s) under {root}", file=sys.stderr)  # fmt: skip
        for teacher, student in pairs:
            weights = tmp / f"teacher_{teacher}.safetensors"
            if not weights.exists():
                write_teacher(weights, teacher, args.classes)
            for conf in configs:
                for w in workers:
                    run_dir = tmp / "runs" / f"{teacher}-{student}-{conf}-w{w}"
                    shutil.rmtree(run_dir, ignore_errors=True)
                    overrides = [
                        "data.format=lmdb", "data.dataset=synthetic-imagenet", f"data.data_path={root / 'lmdb'}",
                        f"data.image_size={args.image_size}", f"data.val_resize={int(args.image_size * 8 / 7)}",
                        f"data.batch_size={args.batch_size}", f"data.workers={w}", f"model.teacher={teacher}",
                        f"model.student={student}", f"model.teacher_weights={weights}",
                        "distill.allow_weak_teacher=true",  # a random teacher: speed is measured, not accuracy
                        f"model.teacher_cache={tmp / 'teacher_cache'}", f"distill.loss={args.loss}",
                        *(["distill.T=2", "distill.alpha=2.5"] if args.loss == "wsld" else []),
                        f"train.epochs={args.epochs}", f"train.log_every={args.log_every}", "train.progress=false",
                        "train.lr=0.01", *CONFIGS[conf],
                    ]  # fmt: skip
                    wall = run_wsld(cmd, ["train", *overrides, "--out", str(run_dir)], env, tmp / "train.log")
                    res = summarise(read_windows(run_dir / "metrics.jsonl"), args.batch_size, args.log_every)
                    start = next(json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()
                                 if json.loads(line).get("kind") == "start")  # fmt: skip
                    res.update({"teacher": teacher, "student": student, "config": conf, "workers": w, "wall_s": wall,
                                "amp": start.get("amp"), "channels_last": start.get("channels_last")})  # fmt: skip
                    results.append(res)
                    ips = f"{res['img_per_s']:.1f}" if res.get("windows") else "n/a"
                    dw = f"{res['data_wait_frac']:.2f}" if res.get("windows") else "n/a"
                    print(f"  {teacher} -> {student}, {conf}, workers {w}: {ips} img/s, data wait {dw} ({wall:.0f} s)", file=sys.stderr)
    finally:
        if not args.workdir:
            shutil.rmtree(tmp, ignore_errors=True)

    info = machine(torch.device(device) if cuda else None)
    print(f"\n{info['device']} ({info['host']}), torch {info['torch']}, load average {info['load_average_1min']}; "
          f"{n_train} JPEGs ~500x375 in {args.classes} classes -> LMDB; crop {args.image_size} px, batch {args.batch_size}, "
          f"loss {args.loss}, {args.epochs} epoch(s), windows of {args.log_every} steps (first window of each epoch left out)")  # fmt: skip
    head = f"{'teacher -> student':<30}{'config':<9}{'workers':>8}{'img/s':>9}{'data wait':>11}   {'img/s per window: median (min-max)':<36}{'bound':>9}"
    print(head)
    for r in results:
        if not r.get("windows"):
            print(f"{r['teacher'] + ' -> ' + r['student']:<30}{r['config']:<9}{r['workers']:>8}   no steady-state window: use more --images")
            continue
        iw = r["img_per_s_windows"]
        bound = "data" if r["data_wait_frac"] > 0.5 else ("compute" if r["data_wait_frac"] < 0.2 else "mixed")
        spread = f"{iw['median']:.1f} ({iw['min']:.1f}-{iw['max']:.1f})"
        print(f"{r['teacher'] + ' -> ' + r['student']:<30}{r['config']:<9}{r['workers']:>8}{r['img_per_s']:>9.1f}"
              f"{r['data_wait_frac']:>11.2f}   {spread:<36}{bound:>9}")  # fmt: skip
    record = {
        "date": now(), "command": command_line("train_throughput.py", argv), "machine": info, "device_type": device,
        "images": n_train, "unique_images": args.images, "classes": args.classes, "image_size": args.image_size, "batch_size": args.batch_size,
        "loss": args.loss, "epochs": args.epochs, "log_every": args.log_every, "threads": args.threads, "generate_s": gen_s,
        "pack_train_s": pack_s["train"], "runs": results,
    }  # fmt: skip
    if not args.no_save:
        print(f"\nappended to {append_result(args.out, record)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
