"""``wsld demo`` from start to end: settings from the arguments, data, the two phases of runs, results, report."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

from wsld.demo.collect import collect, training_span
from wsld.demo.data import ExportPlan, data_folder_name, prepare_data
from wsld.demo.plan import FULL, QUICK, STUDENT_LRS, RunSpec, Settings, plan_students, plan_teachers_and_tuning, run_state, select_lrs, write_configs
from wsld.demo.plots import make_plots
from wsld.demo.report import write_report
from wsld.demo.runner import Runner, duration
from wsld.errors import UserError


def settings_from_args(args: argparse.Namespace) -> Settings:
    import torch

    base = dict(QUICK if args.quick else FULL)
    if args.variants:
        base["variants"] = tuple(dict.fromkeys(args.variants))
    for key in ("seeds", "epochs", "teacher_epochs"):
        value = getattr(args, key)
        if value is not None:
            base[key] = value
    if args.limit_per_class is not None:
        base["train_per_class"] = base["val_per_class"] = args.limit_per_class
        base["tune_per_class"] = max(1, min(base["tune_per_class"], args.limit_per_class // 2))
    if args.tune_epochs is not None:
        base["tune_epochs"] = args.tune_epochs
    cpus = os.cpu_count() or 1
    jobs = args.jobs if args.jobs is not None else (1 if torch.cuda.is_available() else min(2, cpus))
    threads = args.threads if args.threads is not None else max(1, cpus // max(1, jobs))
    s = Settings(**base, batch_size=args.batch_size, jobs=jobs, threads=threads, quick=args.quick, source=args.data_path)
    for key in ("seeds", "epochs", "teacher_epochs", "tune_epochs", "batch_size", "jobs", "threads"):
        if getattr(s, key) < 1:
            raise UserError(f"--{key.replace('_', '-')} must be >= 1, got {getattr(s, key)}")
    if s.train_per_class is not None and s.train_per_class < 1:
        raise UserError(f"--limit-per-class must be >= 1, got {s.train_per_class}")
    return s


def command_line(args: argparse.Namespace) -> str:
    """The demo's command as typed (the options that were given), for the report."""
    parts = ["wsld", "demo"]
    if args.quick:
        parts.append("--quick")
    for key in ("out", "seeds", "variants", "epochs", "teacher_epochs", "tune_epochs", "jobs", "threads", "batch_size",
                "limit_per_class", "data_path"):
        value = getattr(args, key)
        if value is None or (key == "batch_size" and value == 128):
            continue
        flag = "--" + key.replace("_", "-")
        parts += [flag, *map(str, value)] if isinstance(value, list) else [flag, str(value)]
    return " ".join(parts)


def _exit_on_sigterm(signum, frame) -> None:
    raise SystemExit(128 + signum)  # unwinds through the runner, which stops its wsld train processes


def run(args: argparse.Namespace) -> int:
    """``wsld demo``; a SIGTERM (kill) unwinds like Ctrl-C, so the training processes stop with it."""
    if threading.current_thread() is not threading.main_thread():
        return _run_demo(args)
    previous = signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        return _run_demo(args)
    finally:
        signal.signal(signal.SIGTERM, previous)


def _run_demo(args: argparse.Namespace) -> int:
    import torch

    t_start = time.perf_counter()
    load_start = os.getloadavg()[0]
    s = settings_from_args(args)
    out = Path(os.path.expanduser(args.out))
    stream = sys.stderr
    progress = not args.no_progress

    def log(msg: str) -> None:
        from tqdm import tqdm

        tqdm.write(f"[demo] {msg}", file=stream)

    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create the demo folder {out}: {e.strerror or e} (choose another --out)") from None
    log(f"{out}: {s.seeds} seed(s), {', '.join(s.variants)}; {s.epochs} student epochs, {s.teacher_epochs} teacher "
        f"epochs; {s.jobs} run(s) at a time")
    data = out / "data"
    main_plan: ExportPlan = {"train": ("train", 0, s.train_per_class), "val": ("val", 0, s.val_per_class)}
    lmdb_dir, data_commands = prepare_data(data / data_folder_name(s.train_per_class, s.val_per_class), main_plan, s, log)
    n = s.tune_per_class  # tuning split: train = the first n training images per class, val = the next n
    tune_plan: ExportPlan = {"train": ("train", 0, n), "val": ("train", n, n)}
    tune_lmdb, tune_commands = prepare_data(data / f"fashion-mnist-tune-{n}", tune_plan, s, log)

    def run_phase(specs: list[RunSpec]) -> dict[str, float]:
        states = {sp.name: run_state(sp) for sp in specs}  # refuses runs of other settings before writing anything
        write_configs(specs)
        return Runner(specs, states, s, progress, log, stream).run()

    phase1, variants = plan_teachers_and_tuning(out, lmdb_dir, tune_lmdb, s)
    times = run_phase(phase1)
    lrs = select_lrs(phase1)
    log("learning rates chosen on held-out training images: "
        + ", ".join(f"{loss} {v['lr']:g}" for loss, v in lrs.items()))
    phase2 = plan_students(out, lmdb_dir, s, variants, lrs)
    times.update(run_phase(phase2))
    specs = phase1 + phase2

    from wsld.data.builtin import FASHION_MNIST_CLASSES

    results = collect(specs, variants, list(FASHION_MNIST_CLASSES))
    plots = make_plots(results, out / "plots", s.seeds)
    timings_path = out / "timings.json"
    timings = json.loads(timings_path.read_text(encoding="utf-8")) if timings_path.is_file() else {}
    timings.update({k: round(v, 1) for k, v in times.items()})
    from wsld.checkpoint import atomic_write_text

    atomic_write_text(timings_path, json.dumps(timings, indent=2))
    runs_meta = []
    for sp in specs:
        summ = json.loads((sp.run_dir / "summary.json").read_text(encoding="utf-8"))
        runs_meta.append({
            "name": sp.name, "variant": sp.variant, "loss": sp.loss, "seed": sp.seed,
            "config": str(sp.config_path), "run_dir": str(sp.run_dir), "top1": summ["last_top1"],
            "best_top1": summ["best_top1"], "best_epoch": summ["best_epoch"], "seconds": timings.get(sp.name),
        })  # fmt: skip
    meta = {
        "command": command_line(args),
        "settings": {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(s).items()},
        "recipe": {"epochs": s.epochs, "teacher_epochs": s.teacher_epochs, "batch_size": s.batch_size},
        "machine": {"cpus": os.cpu_count(), "torch": torch.__version__, "load_start": load_start,
                    "load_end": os.getloadavg()[0],
                    "device": "CUDA " + torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"},
        "data_root": str(lmdb_dir.parent), "data_commands": data_commands, "tune_commands": tune_commands,
        "tuning": {"lrs": list(STUDENT_LRS), "per_class": s.tune_per_class, "epochs": s.tune_epochs, "chosen": lrs},
        "wall_s": time.perf_counter() - t_start,
        "runs_s": sum(v for v in timings.values()),
        "training_span_s": training_span(specs),
        "runs": runs_meta,
    }  # fmt: skip
    table = write_report(out, results, meta, plots)
    atomic_write_text(out / "results.json", json.dumps({**meta, "variants": results}, indent=2))
    print(table.lstrip("\n"))
    print(f"\nreport: {out / 'report.md'}  results: {out / 'results.json'}  plots: {out / 'plots'}  "
          f"({duration(meta['wall_s'])})")
    return 0
