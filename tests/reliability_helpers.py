"""Helpers for tests/test_reliability_*.py: run ``wsld`` in a subprocess, SIGKILL it at a chosen
moment, and compare run directories."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import torch

VENV_BIN = Path(sys.executable).parent
WSLD = [str(VENV_BIN / "wsld")]
TORCHRUN_2 = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "wsld"]

# a tiny deterministic distillation run: digits (8x8), 21 steps per epoch, a log line every 4 steps and
# a mid-epoch checkpoint every 8 steps (a multiple of log_every, so a resumed log window lines up)
TINY = [
    "data.dataset=digits", "data.batch_size=64", "data.workers=0", "train.progress=false",
    "teacher_train.epochs=1", "train.log_every=4", "checkpoint.every_steps=8", "train.seed=0", "train.lr=0.025",
    # the models and loss settings these tests were written for, pinned so a new built-in default does not change them
    "model.teacher=cnn_teacher", "model.student=cnn_student", "distill.T=4.0", "distill.alpha=2.25",
]  # fmt: skip

# metric fields that measure time, not training
VOLATILE = {"time", "img_per_s", "data_wait_frac", "run_dir"}


def sub_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1", WSLD_TEST="1")
    for k in ("WSLD_TEST_SLOW_SAVE", "WSLD_TEST_SLOW_EVAL", "WSLD_STOP_AFTER_STEPS"):
        env.pop(k, None)
    env.update(extra)
    return env


def run_to_end(cmd: list[str], log: Path, env: Optional[dict] = None, timeout: float = 180) -> subprocess.CompletedProcess:
    with open(log, "wb") as out:
        p = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, env=env or sub_env(), timeout=timeout)
    return p


def start(cmd: list[str], log: Path, **env: str) -> subprocess.Popen:
    """Start ``cmd`` in its own session (so ``finish`` can kill its whole tree), output to ``log``."""
    with open(log, "wb") as out:
        return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=sub_env(**env), start_new_session=True)


def wait_for(pred: Callable[[], bool], p: subprocess.Popen, log: Path, timeout: float = 120) -> None:
    """Poll ``pred`` until true; fail with the log's tail if ``p`` ends first or time runs out."""
    deadline = time.monotonic() + timeout
    while not pred():
        if p.poll() is not None:
            raise AssertionError(f"ended (exit {p.returncode}) too early:\n{log.read_text(errors='replace')[-3000:]}")
        assert time.monotonic() < deadline, log.read_text(errors="replace")[-3000:]
        time.sleep(0.02)


def finish(p: subprocess.Popen) -> None:
    """Kill what is left of a process started by ``start``."""
    if p.poll() is None:
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()


def run_and_kill(
    cmd: list[str],
    log: Path,
    when: Callable[[], bool],
    env: Optional[dict] = None,
    timeout: float = 180,
    victims: Optional[Callable[[int], list[int]]] = None,
) -> int:
    """Start ``cmd`` in its own session and poll ``when()``; once it is true, SIGKILL ``victims(pid)``
    (default: the process and all its descendants; torchrun puts its workers in their own process
    groups). Fails if the process ends on its own first. Returns the exit status."""
    with open(log, "wb") as out:
        p = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env or sub_env(), start_new_session=True)
    deadline = time.monotonic() + timeout
    killed: list[int] = []
    try:
        while True:
            if when():
                killed = (victims or process_tree)(p.pid)
                for pid in killed:
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                break
            if p.poll() is not None:
                raise AssertionError(f"{cmd[:3]} ended (exit {p.returncode}) before the kill point:\n{log.read_text(errors='replace')[-3000:]}")
            if time.monotonic() > deadline:
                raise AssertionError(f"kill point not reached in {timeout}s:\n{log.read_text(errors='replace')[-3000:]}")
            time.sleep(0.01)
        rc = p.wait(timeout=60)
    finally:
        if p.poll() is None:
            for pid in process_tree(p.pid):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            p.wait()
    _wait_gone(killed)
    return rc


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _wait_gone(pids: list[int], timeout: float = 30) -> None:
    """Wait until the killed processes are gone (so none still writes into the run directory)."""
    deadline = time.monotonic() + timeout
    while any(_alive(pid) for pid in pids):
        assert time.monotonic() < deadline, f"processes {pids} survived SIGKILL"
        time.sleep(0.02)


def watch(path: Path, predicate: Callable[[list[dict]], bool]) -> Callable[[], bool]:
    """A cheap ``when`` for ``run_and_kill``: re-parse metrics.jsonl only when its size changed."""
    seen = {"size": -1, "value": False}

    def check() -> bool:
        try:
            size = (Path(path) / "metrics.jsonl").stat().st_size
        except OSError:
            return False
        if size != seen["size"]:
            seen["size"], seen["value"] = size, bool(predicate(records(path)))
        return seen["value"]

    return check


def records(run_dir: Path) -> list[dict]:
    """metrics.jsonl as a list of dicts (a half-written last line, left by a kill, is dropped)."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    return out


def stable(recs: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in VOLATILE} for r in recs]


def _ppid(pid: int) -> int:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return -1
    return int(stat.rsplit(")", 1)[1].split()[1])


def child_pids(pid: int) -> list[int]:
    """Direct children of ``pid`` (from /proc, no psutil)."""
    return [int(e.name) for e in Path("/proc").iterdir() if e.name.isdigit() and _ppid(int(e.name)) == pid]


def process_tree(pid: int) -> list[int]:
    """``pid``'s descendants (deepest first) then ``pid``."""
    out: list[int] = []
    for child in child_pids(pid):
        out += process_tree(child)
    return out + [pid]


def worker_with_rank(launcher_pid: int, rank: int) -> int:
    """The torchrun worker process whose environment says RANK=<rank>."""
    for pid in child_pids(launcher_pid):
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in env:
            return pid
    raise AssertionError(f"no worker with RANK={rank} under {launcher_pid}")


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def assert_same_tensors(a: dict, b: dict, what: str) -> None:
    assert a.keys() == b.keys(), f"{what}: different keys"
    for k in a:
        assert torch.equal(a[k], b[k]), f"{what}: tensor {k} differs"


def assert_same_optimizer(a: dict, b: dict) -> None:
    assert a["param_groups"] == b["param_groups"]
    assert a["state"].keys() == b["state"].keys()
    for i in a["state"]:
        for k, v in a["state"][i].items():
            if isinstance(v, torch.Tensor):
                assert torch.equal(v, b["state"][i][k]), f"optimizer state {i}.{k} differs"
            else:
                assert v == b["state"][i][k]


def assert_same_run(got: Path, want: Path) -> list[dict]:
    """Finished run ``got`` ended exactly like ``want``: weights, optimizer, metrics log, summary.

    The log of a resumed run also holds one ``resume`` record per resume; they are returned and
    left out of the comparison."""
    a, b = load(got / "last.pt"), load(want / "last.pt")
    assert_same_tensors(a["student"], b["student"], "last.pt student")
    assert_same_optimizer(a["optimizer"], b["optimizer"])
    assert (a["epoch"], a["step_in_epoch"], a["global_step"]) == (b["epoch"], b["step_in_epoch"], b["global_step"])
    assert_same_tensors(load(got / "best.pt")["student"], load(want / "best.pt")["student"], "best.pt student")
    for line in (got / "metrics.jsonl").read_text(encoding="utf-8").splitlines():
        json.loads(line)  # no half-written line survives a resume
    resumes = [r for r in records(got) if r["kind"] == "resume"]
    got_recs = stable([r for r in records(got) if r["kind"] != "resume"])
    want_recs = stable(records(want))
    epochs = [r["epoch"] for r in got_recs if r["kind"] == "eval"]
    assert epochs == sorted(set(epochs)), f"eval epochs duplicated or out of order: {epochs}"
    assert [(r["kind"], r.get("global_step")) for r in got_recs] == [(r["kind"], r.get("global_step")) for r in want_recs]
    assert got_recs == want_recs
    sa = {k: v for k, v in json.loads((got / "summary.json").read_text()).items() if k != "run_dir"}
    sb = {k: v for k, v in json.loads((want / "summary.json").read_text()).items() if k != "run_dir"}
    assert sa == sb
    return resumes


def final_files_loadable(run_dir: Path) -> None:
    """Every file under a final (non-dot) name in the run directory is complete."""
    for f in Path(run_dir).iterdir():
        if f.name.startswith(".") or f.is_dir():
            continue
        if f.suffix == ".pt":
            ck = load(f)
            assert "student" in ck, f
        elif f.suffix == ".json":
            json.loads(f.read_text())
        elif f.suffix == ".yaml":
            from omegaconf import OmegaConf

            OmegaConf.load(f)
