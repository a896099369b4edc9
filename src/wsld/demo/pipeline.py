"""``wsld compare`` from start to end: the run folder's checks, the estimate, the search rounds, the final runs, results and report.

Every decision (the next search points, the chosen values) is a pure function of the finished
runs' summaries, so running the same command again continues where it stopped and reuses
everything that finished.
"""

from __future__ import annotations

import json
import os
import resource
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Optional

from wsld.demo import estimate
from wsld.demo.plan import (ROW_BY_KEY, SEARCH_SEED, RunSpec, Settings, read_summary, row_dims, run_state,
                            split_sizes, start_values, store_config, student_config, student_epochs, teacher_config,
                            teacher_dims, teacher_epochs, use_store, write_config)  # fmt: skip
from wsld.demo.runner import Runner, duration
from wsld.demo.search import Point, RowSearch, choose, describe, make_point, max_runs, min_runs
from wsld.errors import UserError

IDENTITY_FILE = "compare.json"


def cpu_seconds() -> float:
    """User + system CPU of this process and of its finished child processes."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def _point_name(p: Point) -> str:
    return "-".join(f"{k}{v:g}" for k, v in p)


def check_folder(out: Path, s: Settings, clear_hint: str) -> None:
    """Refuses, before anything is written, a folder that holds something other than this comparison."""
    ident = out / IDENTITY_FILE
    if ident.is_file():
        try:
            saved = json.loads(ident.read_text(encoding="utf-8"))
        except ValueError:
            saved = None
        mine = s.identity()
        if saved != mine:
            diff = [k for k in mine if not isinstance(saved, dict) or saved.get(k) != mine[k]]
            raise UserError(f"{out} holds a comparison made with other settings ({', '.join(diff) or 'unreadable'}): "
                            f"{clear_hint}")
    elif out.is_dir() and any(out.iterdir()):
        raise UserError(f"{out} is not empty and holds no comparison ({IDENTITY_FILE} missing): {clear_hint}")
    elif out.exists() and not out.is_dir():
        raise UserError(f"{out} is a file, not a folder: give another --out")


class Comparison:
    """The planned runs of one comparison, derived from the settings and the finished runs."""

    def __init__(self, s: Settings, out: Path, base: Any, command: str, log: Callable[[str], None]) -> None:
        self.s, self.out, self.base, self.command, self.log = s, out, base, command, log
        self.specs: dict[str, RunSpec] = {}
        self.searches = {r.key: RowSearch(row_dims(base, r), s.limit) for r in s.chosen_rows}
        self.teacher_search = RowSearch(teacher_dims(base), s.limit)
        self.given_teacher = base.model.teacher_weights
        self.teacher_model, self.student_model = base.model.teacher, base.model.student
        self.distilled = [r for r in s.chosen_rows if r.distilled]
        counts, self.n_test = split_sizes(base, 0.0)
        self.classes = len(counts)
        self.n_train = sum(counts)
        held_counts, self.n_held = split_sizes(base, s.holdout)
        self.n_search_train = sum(held_counts)
        self.costs: Optional[estimate.Costs] = None
        self.chosen: dict[str, Point] = {}
        self.budget: Optional[int] = None
        self.teacher_lr: Optional[float] = None

    # ---- specs ------------------------------------------------------------------------------
    def _spec(self, name: str, phase: str, row: str, seed: int, cfg: Any, deps: list[str], what: str,
              point: Optional[Point] = None, crops: int = 0) -> RunSpec:
        if name in self.specs:
            return self.specs[name]
        run_dir = self.out / ("stores" if row == "store" else "runs") / name
        n_train = self.n_search_train if phase == "search" else self.n_train
        n_val = self.n_held if phase == "search" else self.n_test
        epochs = crops or cfg.train.epochs
        steps = epochs * max(1, n_train // cfg.data.batch_size)
        cost = 1.0
        if self.costs is not None:
            if row == "store":
                cost = estimate.store_cost(self.costs, self.teacher_model, crops, n_train)
            else:
                model = self.teacher_model if row == "teacher" else self.student_model
                online = row != "teacher" and ROW_BY_KEY[row].distilled and not cfg.distill.soft_labels
                cost = estimate.run_cost(self.costs, model, epochs, n_train, n_val, self.teacher_model, online)
        sp = RunSpec(name, phase, row, seed, cfg, self.out / "configs" / f"{name}.yaml", run_dir,
                     self.out / "logs" / f"{name}.log", deps, cost, steps, crops, point, what)
        sp.crops_topk = self.classes
        self.specs[name] = sp
        return sp

    def _done(self, name: str) -> bool:
        sp = self.specs.get(name)
        return sp is not None and sp.done_path.is_file()

    def _scores(self, prefix: str, search: RowSearch) -> dict[Point, float]:
        out = {}
        for sp in self.specs.values():
            if sp.phase == "search" and sp.row == prefix and sp.point is not None and sp.done_path.is_file():
                out[sp.point] = float(read_summary(sp)["last_top1"])
        return out

    def teacher_search_spec(self, p: Point) -> RunSpec:
        cfg = teacher_config(self.base, self.s, dict(p)["lr"], self.s.holdout)
        return self._spec(f"search-teacher-{_point_name(p)}", "search", "teacher", SEARCH_SEED, cfg, [],
                          f"teacher search run at {describe(p)} (val = held-out training images)", p)

    def final_teacher_spec(self, lr: float) -> RunSpec:
        cfg = teacher_config(self.base, self.s, lr, 0.0)
        return self._spec("teacher", "final", "teacher", SEARCH_SEED, cfg, [], f"the teacher (CE), lr {lr:g}")

    def store_spec(self, phase: str, seed: int, teacher: str, teacher_dep: list[str]) -> Optional[RunSpec]:
        """The soft-label store every distilled row of this phase and seed reads, or None (online teacher)."""
        n = self.n_search_train if phase == "search" else self.n_train
        crops = student_epochs(self.base, self.s)
        if not self.distilled or not use_store(self.classes, n, crops):
            return None
        row = self.distilled[0]
        cfg = store_config(student_config(self.base, self.s, row, start_values(self.base, row), seed,
                                          self.s.holdout if phase == "search" else 0.0, teacher, None))
        name = "store-search" if phase == "search" else f"store-s{seed}"
        return self._spec(name, phase, "store", seed, cfg, teacher_dep,
                          f"the teacher's outputs on {crops} crops per training image, seed {seed}", crops=crops)

    def student_spec(self, phase: str, key: str, p: Point, seed: int, teacher: Optional[str],
                     teacher_dep: list[str], store: Optional[RunSpec]) -> RunSpec:
        row = ROW_BY_KEY[key]
        holdout = self.s.holdout if phase == "search" else 0.0
        cfg = student_config(self.base, self.s, row, dict(p), seed, holdout, teacher if row.distilled else None,
                             store.run_dir.resolve() if store is not None and row.distilled else None)
        deps = ([store.name] if store is not None else teacher_dep) if row.distilled else []
        if phase == "search":
            return self._spec(f"search-{key}-{_point_name(p)}", phase, key, SEARCH_SEED, cfg, deps,
                              f"search run of {row.name} at {describe(p)} (val = held-out training images)", p)
        return self._spec(f"{key}-s{seed}", phase, key, seed, cfg, deps, f"{row.name} at {describe(p)}, seed {seed}")

    # ---- rounds -----------------------------------------------------------------------------
    def next_round(self) -> list[RunSpec]:
        """Every run that can be planned now from the finished ones (finished ones included)."""
        s, out = self.s, []
        # the teacher: given, trained at the config's rate (no search), or searched then trained
        search_teacher: Optional[str] = None
        search_teacher_dep: list[str] = []
        final_teacher: Optional[str] = None
        final_dep: list[str] = []
        if self.given_teacher:
            search_teacher = final_teacher = self.given_teacher
        elif not s.search:
            self.teacher_lr = float(self.base.teacher_train.lr)
        else:
            pending, best = self.teacher_search.pending(self._scores("teacher", self.teacher_search))
            out += [self.teacher_search_spec(p) for p in pending]
            if best is not None:
                self.teacher_lr = dict(best)["lr"]
                sp = self.specs[f"search-teacher-{_point_name(best)}"]
                search_teacher = str((sp.run_dir / "last.pt").resolve())
        if not self.given_teacher and self.teacher_lr is not None:
            t = self.final_teacher_spec(self.teacher_lr)
            out.append(t)
            final_teacher, final_dep = str((t.run_dir / "last.pt").resolve()), [t.name]
        # the rows' searches
        all_bracketed = True
        if s.search:
            store = None
            if search_teacher is not None:
                store = self.store_spec("search", SEARCH_SEED, search_teacher, search_teacher_dep)
                if store is not None:
                    out.append(store)
            bests: dict[str, Point] = {}
            for row in s.chosen_rows:
                if row.distilled and search_teacher is None:
                    all_bracketed = False
                    continue
                search = self.searches[row.key]
                pending, best = search.pending(self._scores(row.key, search))
                out += [self.student_spec("search", row.key, p, SEARCH_SEED, search_teacher, search_teacher_dep, store)
                        for p in pending]  # fmt: skip
                if best is None:
                    all_bracketed = False
                else:
                    bests[row.key] = best
            if all_bracketed:  # every row bracketed: fill each to the common budget, then choose
                scores = {k: self._scores(k, self.searches[k]) for k in bests}
                self.budget = max(len(v) for v in scores.values())
                filled = True
                for key, best in bests.items():
                    fill = self.searches[key].fill(best, set(scores[key]), self.budget)
                    todo = [p for p in fill if p not in scores[key]]
                    out += [self.student_spec("search", key, p, SEARCH_SEED, search_teacher, search_teacher_dep, store)
                            for p in todo]  # fmt: skip
                    if todo:
                        filled = False
                    else:
                        self.chosen[key] = choose(scores[key], best)
                all_bracketed = filled
        else:
            for row in s.chosen_rows:
                self.chosen[row.key] = make_point(start_values(self.base, row), self.searches[row.key].dims)
        # the final runs, once every row has its values and the teacher is known
        if all_bracketed and len(self.chosen) == len(s.chosen_rows) and (final_teacher or not self.distilled):
            for seed in range(s.seeds):
                store = self.store_spec("final", seed, final_teacher, final_dep) if final_teacher else None
                if store is not None:
                    out.append(store)
                for row in s.chosen_rows:
                    out.append(self.student_spec("final", row.key, self.chosen[row.key], seed, final_teacher,
                                                 final_dep, store))  # fmt: skip
        return out

    def finished(self) -> bool:
        return bool(self.chosen) and all(self._done(f"{r.key}-s{seed}") for r in self.s.chosen_rows
                                         for seed in range(self.s.seeds))  # fmt: skip

    # ---- the estimate -----------------------------------------------------------------------
    def estimate_seconds(self) -> tuple[float, float, int, int]:
        """(fewest, most) CPU seconds and search runs of the whole comparison, before anything runs."""
        assert self.costs is not None
        c, s = self.costs, self.s
        e_s, e_t = student_epochs(self.base, s), teacher_epochs(self.base, s)
        student = lambda n_tr, n_v, distilled: estimate.run_cost(  # noqa: E731
            c, self.student_model, e_s, n_tr, n_v, self.teacher_model,
            distilled and not use_store(self.classes, n_tr, e_s))
        teacher = lambda n_tr, n_v: estimate.run_cost(c, self.teacher_model, e_t, n_tr, n_v)  # noqa: E731
        fixed = 0.0
        if not self.given_teacher:
            fixed += teacher(self.n_train, self.n_test)
        if self.distilled and use_store(self.classes, self.n_train, e_s):
            fixed += s.seeds * estimate.store_cost(c, self.teacher_model, e_s, self.n_train)
        fixed += s.seeds * sum(student(self.n_train, self.n_test, r.distilled) for r in s.chosen_rows)
        if not s.search:
            return fixed, fixed, 0, 0
        lo_runs = max(min_runs(self.searches[r.key].dims) for r in s.chosen_rows)
        hi_runs = max(max_runs(self.searches[r.key].dims, s.limit) for r in s.chosen_rows)
        per_run = {r.key: student(self.n_search_train, self.n_held, r.distilled) for r in s.chosen_rows}
        lo = hi = fixed
        if self.distilled and use_store(self.classes, self.n_search_train, e_s):
            lo += estimate.store_cost(c, self.teacher_model, e_s, self.n_search_train)
            hi = lo
        if not self.given_teacher:
            lo += 3 * teacher(self.n_search_train, self.n_held)
            hi += (3 + s.limit) * teacher(self.n_search_train, self.n_held)
        lo += lo_runs * sum(per_run.values())
        hi += hi_runs * sum(per_run.values())
        return lo, hi, len(s.chosen_rows) * lo_runs, len(s.chosen_rows) * hi_runs


def _exit_on_sigterm(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)  # unwinds through the runner, which stops its processes


def run_compare(s: Settings, out: Path, command: str, *, progress: bool = True, clear_hint: str = "",
                label: str = "compare", quick_note: Optional[str] = None, extra_meta: Optional[dict] = None,
                prepare: Optional[Callable[[Callable[[str], None]], None]] = None) -> int:
    """Runs a comparison into ``out``; a SIGTERM (kill) unwinds like Ctrl-C, so the training processes stop with it.

    ``prepare(log)`` runs once the folder is checked, before the data is read (the demo's --quick writes its data).
    """
    a = (s, out, command, progress, clear_hint, label, quick_note, extra_meta, prepare)
    if threading.current_thread() is not threading.main_thread():
        return _run(*a)
    previous = signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        return _run(*a)
    finally:
        signal.signal(signal.SIGTERM, previous)


def _run(s: Settings, out: Path, command: str, progress: bool, clear_hint: str, label: str,
         quick_note: Optional[str], extra_meta: Optional[dict], prepare: Any) -> int:
    import torch

    from wsld.config import load_config
    from wsld.demo.collect import collect
    from wsld.demo.plots import make_plots
    from wsld.demo.report import write_report
    from wsld.files import atomic_write_text

    t_start, cpu_start, load_start = time.perf_counter(), cpu_seconds(), os.getloadavg()[0]
    stream = sys.stderr
    clear_hint = clear_hint or (f"run the same command as before (the settings are in {out / IDENTITY_FILE}), give "
                                f"another --out, or remove the folder first (rm -rf {out})")

    def log(msg: str) -> None:
        from tqdm import tqdm

        tqdm.write(f"[{label}] {msg}", file=stream)

    base = load_config(s.config, list(s.overrides))
    check_folder(out, s, clear_hint)  # before anything is written
    if quick_note:
        log(quick_note)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create the folder {out}: {e.strerror or e} (choose another --out)") from None
    atomic_write_text(out / IDENTITY_FILE, json.dumps(s.identity(), indent=2))
    if prepare is not None:
        prepare(log)
    cmp = Comparison(s, out, base, command, log)
    if s.search and cmp.n_held < cmp.classes:
        raise UserError(f"--holdout {s.holdout:g} leaves {cmp.n_held} held-out training images for {cmp.classes} classes: "
                        "give a larger --holdout (or more training images)")
    cmp.costs = estimate.measure(base, [cmp.student_model, cmp.teacher_model])
    cmp.costs.startup = estimate.STARTUP_S["in_process" if s.jobs <= 1 else "process"]
    lo, hi, runs_lo, runs_hi = cmp.estimate_seconds()
    jobs = max(1, s.jobs)
    log(f"{len(s.rows)} rows ({', '.join(s.rows)}) x {s.seeds} seed(s); student {student_epochs(base, s)} epochs, teacher "
        + ("given" if cmp.given_teacher else f"{teacher_epochs(base, s)} epochs")
        + f"; {cmp.n_train:,} training images ({cmp.n_search_train:,} + {cmp.n_held:,} held out for the search), "
        f"{cmp.n_test:,} test images")
    if s.search:
        log(f"search: {runs_lo}" + (f"-{runs_hi}" if runs_hi > runs_lo else "") + " runs in all on held-out training images (each dimension's grid may grow "
            f"{s.limit} points beyond its first 3)")
    log(f"estimated time: {duration(lo / jobs)}" + (f" to {duration(hi / jobs)}" if hi > lo else "")
        + f" with {jobs} run(s) at a time on free cores ({duration(lo)}" + (f"-{duration(hi)}" if hi > lo else "")
        + f" of CPU, from timed steps of these models on this data); longer while other programs use the CPU "
        f"(load average now {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores)")

    times: dict[str, float] = {}
    known = -1
    while True:
        planned = cmp.next_round()
        states = {sp.name: run_state(sp, clear_hint) for sp in planned}
        todo = [sp for sp in planned if states[sp.name] != "done"]
        if not todo:  # a rerun: the finished runs reveal the next ones without training anything
            if cmp.finished():
                break
            if len(cmp.specs) == known:
                raise UserError(f"{label}: nothing left to run but the comparison is not complete; see {out / 'logs'}")
            known = len(cmp.specs)
            continue
        for sp in todo:
            write_config(sp, command)
        times.update(Runner(todo, {sp.name: states[sp.name] for sp in todo}, s, progress, log, stream,
                            label=f"wsld {label}").run())  # fmt: skip
    if s.search:
        log("chosen on held-out training images: " + "; ".join(f"{k} {describe(p)}" for k, p in cmp.chosen.items()))

    results = collect(cmp)
    plots = make_plots(results, out / "plots", quick=bool(quick_note))
    timings_path = out / "timings.json"
    timings = json.loads(timings_path.read_text(encoding="utf-8")) if timings_path.is_file() else {}
    timings.update({k: round(v, 1) for k, v in times.items()})
    # every invocation that trained something: an interrupted comparison's time is their sum
    invocations = [i for i in timings.pop("_invocations", []) if isinstance(i, dict)]
    wall_s, cpu_s = time.perf_counter() - t_start, cpu_seconds() - cpu_start
    if times:
        invocations.append({"started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(time.time() - wall_s)),
                            "wall_s": round(wall_s, 1), "cpu_s": round(cpu_s, 1), "runs": len(times),
                            "load_start": load_start, "load_end": os.getloadavg()[0],
                            "estimate_wall_s": [round(lo / jobs, 1), round(hi / jobs, 1)]})  # fmt: skip
    atomic_write_text(timings_path, json.dumps({**timings, "_invocations": invocations}, indent=2))
    meta = {
        "command": command,
        "settings": s.identity(),
        "jobs": s.jobs, "threads": s.threads,
        "machine": {"cpus": os.cpu_count(), "torch": torch.__version__, "load_start": load_start,
                    "load_end": os.getloadavg()[0],
                    "device": "CUDA " + torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"},
        "estimate_s": {"cpu_low": lo, "cpu_high": hi, "wall_low": lo / jobs, "wall_high": hi / jobs},
        "wall_s": wall_s,
        "cpu_s": cpu_s,
        "invocations": invocations,
        "runs_s": sum(times.values()),
        "quick_note": quick_note,
        "runs": [{"name": sp.name, "phase": sp.phase, "row": sp.row, "seed": sp.seed, "config": str(sp.config_path),
                  "run_dir": str(sp.run_dir), "seconds": timings.get(sp.name),
                  "top1": None if sp.is_store else read_summary(sp).get("last_top1")}
                 for sp in cmp.specs.values()],
        **(extra_meta or {}),
    }  # fmt: skip
    text = write_report(out, results, meta, plots)
    atomic_write_text(out / "results.json", json.dumps({**meta, **results}, indent=2))
    print(text.lstrip("\n"))
    print(f"\nreport: {out / 'report.md'}  results: {out / 'results.json'}  plots: {out / 'plots'}  "
          f"({duration(meta['wall_s'])} wall, {duration(meta['cpu_s'])} CPU)")
    return 0


def settings_check(s: Settings) -> None:
    """One-line errors for out-of-range options."""
    for key in ("seeds", "jobs", "threads"):
        if getattr(s, key) < 1:
            raise UserError(f"--{key} must be >= 1, got {getattr(s, key)}")
    for key in ("epochs", "teacher_epochs"):
        v = getattr(s, key)
        if v is not None and v < 1:
            raise UserError(f"--{key.replace('_', '-')} must be >= 1, got {v}")
    if not s.budget > 0:
        raise UserError(f"--budget must be > 0 (a factor on every run's epochs), got {s.budget:g}")
    if not 0 < s.holdout < 1:
        raise UserError(f"--holdout must be in (0, 1) (the share of each class's training images held out), got {s.holdout:g}")
    if s.limit < 0:
        raise UserError(f"--search-limit must be >= 0, got {s.limit}")
    unknown = [r for r in s.rows if r not in ROW_BY_KEY]
    if unknown:
        raise UserError(f"--losses: unknown row {unknown[0]} (rows: {' '.join(ROW_BY_KEY)})")

