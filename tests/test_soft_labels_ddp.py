"""``wsld soft-labels`` on two processes (gloo on CPU, launched by torchrun as users launch N GPUs)
writes the same store as one process: the same keys, metadata and records, byte for byte; a
two-process run killed with SIGKILL part-way resumes (on two processes) to that same store."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import lmdb
import pytest
from engine_helpers import REPO, WSLD, digits_teacher, run_sub, sub_env  # noqa: F401  (fixture)

from wsld.soft_labels.store import COMPLETE_KEY, META_KEY

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone", "-m", "wsld"]
N_IMAGES = 1347  # digits' training split


def soft_labels_args(teacher: str, out: Path) -> list[str]:
    # 8 crops per forward = 4 images per batch: 337 batches, so a kill lands mid-run
    return ["soft-labels", "data.dataset=digits", "data.workers=0", "train.progress=false", "model.teacher=cnn_teacher",
            f"model.teacher_weights={teacher}",
            "--crops", "2", "--topk", "3", "--batch-size", "8", "--out", str(out)]  # fmt: skip


def contents(store: Path) -> dict[bytes, bytes]:
    """Every key and value, the completion record without its time stamp."""
    env = lmdb.open(str(store), readonly=True, lock=False)
    with env.begin() as txn:
        items = dict(txn.cursor())
    env.close()
    done = json.loads(items[COMPLETE_KEY])
    done.pop("time")
    items[COMPLETE_KEY] = json.dumps(done).encode()
    return items


def stored_images(store: Path) -> int:
    if not (store / "data.mdb").is_file():
        return 0
    env = lmdb.open(str(store), readonly=True, lock=False)
    with env.begin() as txn:
        n = sum(1 for k in txn.cursor().iternext(keys=True, values=False) if len(k) == 8)
    env.close()
    return n


def process_tree(pid: int) -> list[int]:
    """``pid`` and all its descendants (torchrun starts its workers in sessions of their own)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        for task in Path(f"/proc/{p}/task").glob("*"):
            with contextlib.suppress(OSError):
                todo += [int(c) for c in (task / "children").read_text().split()]
    return out


def kill_part_way(argv: list[str], store: Path, at_least: int, timeout: float = 240) -> None:
    """Start ``argv`` and SIGKILL it and every process it started once ``store`` holds ``at_least`` images."""
    proc = subprocess.Popen(argv, env=sub_env(), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + timeout
    try:
        while stored_images(store) < at_least:
            assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
            assert time.monotonic() < deadline, "the run stored too few images in time"
            time.sleep(0.05)
    finally:
        tree = process_tree(proc.pid)
        for pid in reversed(tree):  # workers first, so the agent cannot restart them
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        proc.wait()
        time.sleep(0.5)  # the kernel reaps the orphaned workers


@pytest.fixture(scope="module")
def stores(digits_teacher, tmp_path_factory):  # noqa: F811
    base = tmp_path_factory.mktemp("soft_labels_ddp")
    one = run_sub([*WSLD, *soft_labels_args(digits_teacher, base / "one")])
    assert one.returncode == 0, one.stderr[-3000:]
    two = run_sub([*TORCHRUN, *soft_labels_args(digits_teacher, base / "two")])
    assert two.returncode == 0, two.stderr[-3000:]
    kill_part_way([*TORCHRUN, *soft_labels_args(digits_teacher, base / "killed")], base / "killed", at_least=200)
    after_kill = stored_images(base / "killed")
    resumed = run_sub([*TORCHRUN, *soft_labels_args(digits_teacher, base / "killed")])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    return base, one, two, after_kill, resumed


def test_two_processes_write_the_same_store_as_one(stores):
    base, one, two, _, _ = stores
    a, b = contents(base / "one"), contents(base / "two")
    assert a.keys() == b.keys() and len(a) == N_IMAGES + 2
    assert json.loads(a[META_KEY]) == json.loads(b[META_KEY])
    differ = [k for k in a if a[k] != b[k]]
    assert not differ, f"{len(differ)} values differ, first {differ[:3]}"
    assert "2 process(es)" in two.stderr and "1 process(es)" in one.stderr
    # rank 0 alone reports
    assert two.stdout.count("soft labels: 1347 images (1347 new)") == 1


def test_a_killed_two_process_run_resumes_to_the_same_store(stores):
    base, _, _, after_kill, resumed = stores
    assert 200 <= after_kill < N_IMAGES  # killed part-way: the resume had work to do
    assert f"{after_kill} of {N_IMAGES} images already done, {N_IMAGES - after_kill} to go" in resumed.stderr
    assert contents(base / "killed") == contents(base / "one")
