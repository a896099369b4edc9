"""Runs the planned ``wsld train`` / ``wsld soft-labels`` processes in dependency order, in this process or in parallel."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Optional

from wsld.demo.plan import RunSpec, Settings
from wsld.errors import UserError


def duration(seconds: float) -> str:
    """``42s``, ``3m05s``, ``1h02m``."""
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def _run_progress(sp: RunSpec) -> float:
    """Fraction of a running run done, from the global step of its newest metrics line."""
    path = sp.run_dir / "metrics.jsonl"
    try:
        with open(path, "rb") as f:
            f.seek(max(0, path.stat().st_size - 4096))
            tail = f.read().decode("utf-8", "replace").splitlines()
    except OSError:
        return 0.0
    for line in reversed(tail):
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if "global_step" in rec:
            return min(1.0, float(rec["global_step"]) / max(1, sp.steps_total))
    return 0.0


def _log_tail(path: Path, lines: int = 4) -> str:
    try:
        text = path.read_text(encoding="utf-8", errors="replace").strip().splitlines()
    except OSError:
        return ""
    return " | ".join(text[-lines:])


class Runner:
    """Runs the planned runs in dependency order, ``jobs`` at a time, with one progress bar."""

    def __init__(self, specs: list[RunSpec], states: dict[str, str], s: Settings, progress: bool,
                 log: Callable[[str], None], stream: Any, label: str = "wsld compare") -> None:
        self.label = label
        self.specs = {sp.name: sp for sp in specs}
        self.states = states
        self.s = s
        self.log = log
        self.stream = stream
        self.progress = progress
        self.done: set[str] = set()
        self.times: dict[str, float] = {}
        self.total_cost = sum(sp.cost for sp in specs)
        self.done_cost = 0.0
        self.bar = None
        self.running: dict[str, Any] = {}  # names of the runs in progress

    def _progress_value(self, running: dict[str, Any]) -> float:
        return self.done_cost + sum(self.specs[n].cost * _run_progress(self.specs[n]) for n in running)

    def _update(self, running: dict[str, Any]) -> None:
        if self.bar is not None:
            self.bar.n = min(self.total_cost, self._progress_value(running))
            self.bar.set_postfix_str(", ".join(sorted(running)) or "", refresh=False)
            self.bar.refresh()

    def _finished(self, name: str, seconds: float) -> None:
        sp = self.specs[name]
        self.done.add(name)
        self.done_cost += sp.cost
        self.times[name] = seconds
        try:
            summary = json.loads(sp.done_path.read_text(encoding="utf-8"))
            top1 = f"top-1 {summary['last_top1']:.2f}" if not sp.is_store else f"{sp.crops} crops per image stored"
        except (OSError, ValueError, KeyError):
            top1 = "no summary"
        eta = ""
        worked = self._progress_value(self.running) - self.start_cost
        if worked > 0 and len(self.done) < len(self.specs):
            left = self.total_cost - self._progress_value(self.running)
            eta = f", about {duration((time.perf_counter() - self.t0) * left / worked)} left"
        self.log(f"finished {name}: {top1} ({duration(seconds)}; {len(self.done)}/{len(self.specs)} runs done{eta})")

    def run(self) -> dict[str, float]:
        from tqdm import tqdm

        todo = []
        for sp in self.specs.values():
            state = self.states[sp.name]
            if state == "done":
                self.done.add(sp.name)
                self.done_cost += sp.cost
            else:
                todo.append((sp.name, state))
        if len(self.done):
            self.log(f"reusing {len(self.done)} finished run(s) in {next(iter(self.specs.values())).config_path.parent.parent}")
        if not todo:
            return self.times
        # teachers first, then stores: the others wait for them
        todo.sort(key=lambda item: {"teacher": 0, "store": 1}.get(self.specs[item[0]].row, 2))
        self.t0, self.start_cost = time.perf_counter(), self.done_cost
        self.bar = tqdm(total=self.total_cost, initial=self.done_cost, desc=self.label, file=self.stream,
                        disable=not (self.progress and self.stream.isatty()), dynamic_ncols=True, mininterval=1.0,
                        bar_format="{desc}: {percentage:3.0f}%|{bar}| [{elapsed}<{remaining}] {postfix}")
        try:
            if self.s.jobs <= 1:
                self._run_here(todo)
            else:
                self._run_processes(todo)
        finally:
            self.bar.close()
        return self.times

    def _ready(self, pending: list[tuple[str, str]]) -> Optional[tuple[str, str]]:
        for item in pending:  # planned order: teachers first, then seeds; a blocked run waits
            if all(d in self.done or d not in self.specs for d in self.specs[item[0]].deps):  # others: an earlier phase
                return item
        return None

    def _fail(self, name: str, why: str) -> UserError:
        sp = self.specs[name]
        tail = _log_tail(sp.log_path)
        return UserError(f"{self.label}: run {name} failed ({why}); log: {sp.log_path}" + (f": {tail}" if tail else "")
                         + "; fix the cause and run the same command again to continue")

    @staticmethod
    def _complete(sp: RunSpec) -> bool:
        """Whether a process that exited 0 left its result; a store gets its marker here."""
        if sp.is_store and sp.run_dir.is_dir():
            from wsld.files import atomic_write_text

            atomic_write_text(sp.done_path, json.dumps({"store": str(sp.run_dir), "crops": sp.crops}))
        return sp.done_path.is_file()

    def _run_here(self, todo: list[tuple[str, str]]) -> None:
        """One run at a time in this process, exactly as ``wsld train`` (the CLI's main)."""
        import torch

        from wsld.cli import main

        stop = threading.Event()
        current = self.running

        def monitor() -> None:
            while not stop.wait(1.0):
                self._update(current)

        watcher = threading.Thread(target=monitor, daemon=True)
        watcher.start()
        threads, env_threads = torch.get_num_threads(), os.environ.get("OMP_NUM_THREADS")
        torch.set_num_threads(max(1, self.s.threads))
        os.environ["OMP_NUM_THREADS"] = str(max(1, self.s.threads))  # the engine keeps a thread count set so
        try:
            pending = list(todo)
            while pending:
                item = self._ready(pending)
                if item is None:
                    raise self._fail(pending[0][0], "a run it needs did not finish")
                pending.remove(item)
                name, state = item
                sp = self.specs[name]
                current.clear()
                current[name] = True
                sp.log_path.parent.mkdir(parents=True, exist_ok=True)
                t0 = time.perf_counter()
                with open(sp.log_path, "a", encoding="utf-8") as logf, contextlib.redirect_stdout(logf), \
                        contextlib.redirect_stderr(logf):
                    print(f"$ wsld {' '.join(sp.argv(state))}", flush=True)
                    rc = main(sp.argv(state))
                current.clear()
                if rc == 130:  # Ctrl-C: the run keeps its checkpoint, the next demo resumes it
                    raise KeyboardInterrupt
                if rc != 0 or not self._complete(sp):
                    raise self._fail(name, f"exit status {rc}")
                self._finished(name, time.perf_counter() - t0)
                self._update(current)
        finally:
            stop.set()
            torch.set_num_threads(threads)
            if env_threads is None:
                os.environ.pop("OMP_NUM_THREADS", None)
            else:
                os.environ["OMP_NUM_THREADS"] = env_threads

    def _run_processes(self, todo: list[tuple[str, str]]) -> None:
        """``jobs`` parallel ``wsld train`` processes with ``threads`` threads each."""
        env = dict(os.environ)
        env.update(OMP_NUM_THREADS=str(self.s.threads), MKL_NUM_THREADS=str(self.s.threads), PYTHONUNBUFFERED="1")
        pending = list(todo)
        running: dict[str, tuple[subprocess.Popen, float, Any]] = self.running
        try:
            while pending or running:
                while len(running) < self.s.jobs:
                    item = self._ready(pending)
                    if item is None:
                        break
                    pending.remove(item)
                    name, state = item
                    sp = self.specs[name]
                    sp.log_path.parent.mkdir(parents=True, exist_ok=True)
                    logf = open(sp.log_path, "a", encoding="utf-8")
                    argv = sp.argv(state)
                    logf.write(f"$ wsld {' '.join(argv)}\n")
                    logf.flush()
                    proc = subprocess.Popen([sys.executable, "-m", "wsld", *argv], stdout=logf, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, env=env)
                    running[name] = (proc, time.perf_counter(), logf)
                if not running:
                    raise self._fail(pending[0][0], "a run it needs did not finish")
                time.sleep(0.5)
                for name, (proc, t0, logf) in list(running.items()):
                    rc = proc.poll()
                    if rc is None:
                        continue
                    logf.close()
                    del running[name]
                    if rc != 0 or not self._complete(self.specs[name]):
                        raise self._fail(name, f"exit status {rc}")
                    self._finished(name, time.perf_counter() - t0)
                self._update(running)
        finally:  # interrupted or failed: stop the others (their checkpoints let the next demo resume them)
            for proc, _t0, logf in running.values():
                if proc.poll() is None:
                    proc.terminate()
            for proc, _t0, logf in running.values():
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
                logf.close()

