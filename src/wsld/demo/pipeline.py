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
from typing import Any

from wsld.demo.collect import collect, training_span
from wsld.demo.data import prepare_data
from wsld.demo.plan import (ALWAYS_ROWS, QUICK, REGIMES, ROW_BY_KEY, RunSpec, Settings, plan_phase1, plan_students,
                            run_state, select, write_configs)  # fmt: skip
from wsld.demo.plots import make_plots
from wsld.demo.report import QUICK_NOTE, write_report
from wsld.demo.runner import Runner, duration
from wsld.errors import UserError


def settings_from_args(args: argparse.Namespace) -> Settings:
    """The demo's settings: the full (or --quick) defaults with the options given."""
    import torch

    s = Settings(**(QUICK if args.quick else {}))
    if args.regimes:
        s.regimes = tuple(r for r in REGIMES if r in args.regimes)
    if args.losses:
        s.rows = tuple(k for k in ROW_BY_KEY if k in args.losses or k in ALWAYS_ROWS)
    if args.seeds is not None:
        s.seeds = args.seeds
    if args.epochs is not None:
        s.epochs = {r: args.epochs for r in REGIMES}
    if args.teacher_epochs is not None:
        s.teacher_epochs = {r: args.teacher_epochs for r in REGIMES}
    if args.limit_per_class is not None:
        n = args.limit_per_class
        s.train_per_class = s.val_per_class = n
        s.small_per_class = max(2, min(s.small_per_class, n // 10))
        s.heldout_per_class = max(2, min(s.heldout_per_class, n // 4))
    cpus = os.cpu_count() or 1
    # --quick: one run after another in this process (its runs are so short that starting a process
    # per run, ~4 s of CPU each, would cost more than the training)
    s.jobs = args.jobs if args.jobs is not None else (1 if torch.cuda.is_available() or args.quick else min(2, cpus))
    s.threads = args.threads if args.threads is not None else max(1, cpus // max(1, s.jobs))
    s.batch_size, s.quick, s.source = args.batch_size, args.quick, args.data_path
    for key in ("seeds", "batch_size", "jobs", "threads"):
        if getattr(s, key) < 1:
            raise UserError(f"--{key.replace('_', '-')} must be >= 1, got {getattr(s, key)}")
    for key in ("epochs", "teacher_epochs"):
        if min(getattr(s, key).values()) < 1:
            raise UserError(f"--{key.replace('_', '-')} must be >= 1")
    if s.train_per_class is not None and s.train_per_class < 1:
        raise UserError(f"--limit-per-class must be >= 1, got {s.train_per_class}")
    return s


def command_line(args: argparse.Namespace) -> str:
    """The demo's command as typed (the options that were given), for the report."""
    parts = ["wsld", "demo"]
    if args.quick:
        parts.append("--quick")
    for key in ("out", "seeds", "regimes", "losses", "epochs", "teacher_epochs", "jobs", "threads", "batch_size",
                "limit_per_class", "data_path"):  # fmt: skip
        value = getattr(args, key)
        if value is None or (key == "batch_size" and value == 128):
            continue
        flag = "--" + key.replace("_", "-")
        parts += [flag, *map(str, value)] if isinstance(value, list) else [flag, str(value)]
    return " ".join(parts)


def _exit_on_sigterm(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)  # unwinds through the runner, which stops its processes


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
    if s.quick:
        log(QUICK_NOTE)
    added = [k for k in ALWAYS_ROWS if args.losses and k not in args.losses]
    if added:
        log(f"rows {', '.join(s.rows)}: {' and '.join(added)} added (CE and WSLD always run: every paired difference "
            "is WSLD minus another row)")
    log(f"{out}: {s.seeds} seed(s); " + ", ".join(f"{r} {s.epochs[r]} epochs (teacher {s.teacher_epochs[r]})"
        for r in s.regimes) + f"; {s.jobs} run(s) at a time, {s.threads} thread(s) each")  # fmt: skip
    paths = prepare_data(out / "data", s, log)

    def run_phase(specs: list[RunSpec]) -> dict[str, float]:
        states = {sp.name: run_state(sp) for sp in specs}  # refuses runs of other settings before writing anything
        write_configs(specs)
        return Runner(specs, states, s, progress, log, stream).run()

    phase1, regimes = plan_phase1(out, paths, s)
    times = run_phase(phase1)
    chosen = select(phase1, s.chosen_rows)
    log("chosen on held-out training images: " + ", ".join(
        f"{k} lr {c['lr']:g}" + (f" T {c['T']:g}" if c["T"] is not None else "") for k, c in chosen.items()))
    phase2 = plan_students(out, paths, s, regimes, chosen)
    times.update(run_phase(phase2))
    specs = phase1 + phase2

    from wsld.data.builtin import FASHION_MNIST_CLASSES
    from wsld.files import atomic_write_text

    results = collect(specs, regimes, list(FASHION_MNIST_CLASSES), s.chosen_rows)
    plots = make_plots(results, out / "plots", s.seeds, quick=s.quick)
    timings_path = out / "timings.json"
    timings = json.loads(timings_path.read_text(encoding="utf-8")) if timings_path.is_file() else {}
    timings.update({k: round(v, 1) for k, v in times.items()})
    atomic_write_text(timings_path, json.dumps(timings, indent=2))
    runs_meta = []
    for sp in specs:
        summ = json.loads(sp.done_path.read_text(encoding="utf-8"))
        runs_meta.append({
            "name": sp.name, "regime": sp.regime, "row": sp.row, "seed": sp.seed, "config": str(sp.config_path),
            "run_dir": str(sp.run_dir), "top1": summ.get("last_top1"), "seconds": timings.get(sp.name),
        })  # fmt: skip
    meta = {
        "command": command_line(args),
        "rows": list(s.rows),
        "settings": {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(s).items()},
        "epochs": {r: {"student": s.epochs[r], "teacher": s.teacher_epochs[r]} for r in s.regimes},
        "machine": {"cpus": os.cpu_count(), "torch": torch.__version__, "load_start": load_start,
                    "load_end": os.getloadavg()[0],
                    "device": "CUDA " + torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"},
        "data": {"full": paths.full, "small": paths.small, "search": paths.search},
        "search": {"epochs": s.search_epochs, "train_per_class": s.small_per_class,
                   "heldout_per_class": s.heldout_per_class, "runs_per_row": len(ROW_BY_KEY["ce"].grid), "chosen": chosen},
        "wall_s": time.perf_counter() - t_start,
        "runs_s": sum(times.values()),
        "training_span_s": training_span(specs),
        "runs": runs_meta,
    }  # fmt: skip
    text = write_report(out, results, meta, plots)
    atomic_write_text(out / "results.json", json.dumps({**meta, "regimes": results}, indent=2))
    print(text.lstrip("\n"))
    print(f"\nreport: {out / 'report.md'}  results: {out / 'results.json'}  plots: {out / 'plots'}  "
          f"({duration(meta['wall_s'])})")
    return 0
