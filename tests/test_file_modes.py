"""Run files get the mode open() would give them (0666 minus the umask), so a team can share a run folder."""

from __future__ import annotations

import os
import stat

import pytest

from engine_helpers import TINY, digits_teacher, run_cli  # noqa: F401 (fixture)
from wsld.files import atomic_write_text, current_umask


@pytest.fixture
def umask():
    def set_mask(mask: int) -> None:
        os.umask(mask)

    old = os.umask(0o022)
    yield set_mask
    os.umask(old)


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.mark.parametrize("mask", [0o022, 0o027, 0o002])
def test_atomic_writes_follow_the_umask(tmp_path, umask, mask):
    umask(mask)
    assert current_umask() == mask
    atomic_write_text(tmp_path / "a.txt", "x")
    assert _mode(tmp_path / "a.txt") == 0o666 & ~mask


def test_a_run_and_its_export_are_readable_by_the_group(tmp_path, umask, digits_teacher):
    umask(0o027)
    run = tmp_path / "run"
    rc, _, err = run_cli(["train", *TINY, "train.epochs=1", f"model.teacher_weights={digits_teacher}", "--out", str(run)])
    assert rc == 0, err
    for name in ("config.yaml", "last.pt", "best.pt", "summary.json", "metrics.jsonl"):
        assert _mode(run / name) == 0o640, (name, oct(_mode(run / name)))
    rc, _, err = run_cli(["export", str(run / "last.pt"), "--format", "safetensors"])
    assert rc == 0, err
    assert _mode(run / "last.safetensors") == 0o640
