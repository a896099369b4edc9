"""A checkpoint write that fails mid-run (disk full) is one clear error and keeps the previous file."""

import subprocess

import pytest
import torch

from wsld.checkpoint import load_checkpoint, save_checkpoint
from wsld.errors import CheckpointError


@pytest.fixture
def small_tmpfs(tmp_path):
    where = tmp_path / "mnt"
    where.mkdir()
    p = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(where)], capture_output=True, text=True)
    if p.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({p.stderr.strip() or p.returncode})")
    yield where
    subprocess.run(["umount", "-l", str(where)], check=False)


def test_disk_full_during_a_checkpoint_write_keeps_the_previous_one(small_tmpfs):
    path = small_tmpfs / "last.pt"
    small = {"student": {"w": torch.ones(1000)}, "epoch": 1}
    save_checkpoint(small, path)
    big = {"student": {"w": torch.zeros(200_000)}, "epoch": 2}  # 800 kB > 256 kB of disk
    with pytest.raises(CheckpointError) as err:
        save_checkpoint(big, path)
    msg = str(err.value)
    assert "No space left on device" in msg and "previous last.pt is intact" in msg and "--resume" in msg
    again = load_checkpoint(path)
    assert again["epoch"] == 1 and torch.equal(again["student"]["w"], torch.ones(1000))
    assert [p.name for p in small_tmpfs.iterdir()] == ["last.pt"]  # no temp file left behind
