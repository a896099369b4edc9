"""Shared test settings: one CPU thread (fast, deterministic on 2 cores) and a private teacher cache."""

import os

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
