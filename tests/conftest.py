"""Shared test settings: one CPU thread (fast, deterministic on 2 cores) and a private teacher cache."""

import os
import subprocess
from pathlib import Path

import pytest
import torch

# one thread in this process and in every wsld subprocess a test starts (train.threads=0 then
# leaves torch's default alone because OMP_NUM_THREADS is set)
os.environ["OMP_NUM_THREADS"] = "1"
torch.set_num_threads(1)
os.environ.setdefault("WSLD_TEST", "1")


@pytest.fixture
def teacher_cache(tmp_path):
    """model.teacher_cache=... override so tests never touch ~/.cache."""
    return f"model.teacher_cache={tmp_path / 'teacher_cache'}"


@pytest.fixture
def tmpfs(tmp_path):
    """Mount a tmpfs (needs root or CAP_SYS_ADMIN): ``tmpfs("size=64k")``, ``tmpfs("ro")``."""
    mounted = []

    def mount(options: str) -> Path:
        where = tmp_path / f"mnt{len(mounted)}"
        where.mkdir()
        p = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)], capture_output=True, text=True)
        if p.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here ({p.stderr.strip() or p.returncode})")
        mounted.append(where)
        return where

    yield mount
    for where in mounted:
        subprocess.run(["umount", "-l", str(where)], check=False)
