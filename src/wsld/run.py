"""One training run from a config: the runtime, the trainer with its teacher source, and the teardown."""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any

from wsld.config import Config
from wsld.engine.loop import Trainer
from wsld.runtime import Runtime, broadcast_object, setup_runtime, teardown_runtime
from wsld.teachers.select import open_teacher_source


def build_trainer(cfg: Config, run_dir: Path | str, rt: Runtime, *, resume: bool = False, allow_data_change: bool = False) -> Trainer:
    """A student trainer whose teacher source is chosen from ``cfg`` (``teachers.select``)."""
    return Trainer(cfg, run_dir, rt, resume=resume, teacher_factory=partial(open_teacher_source, cfg, rt),
                   allow_data_change=allow_data_change)  # fmt: skip


def run_training(cfg: Config, run_dir: Path | str, resume: bool = False, allow_data_change: bool = False) -> dict[str, Any]:
    """Train (or resume) one run; under torchrun every process calls this with the same arguments.
    ``allow_data_change``: --allow-data-change (data other than a checkpoint's or a store's is accepted)."""
    rt = setup_runtime()
    try:
        # rank 0's folder wins: a default timestamped name may differ by a second between ranks
        run_dir = broadcast_object(rt, str(run_dir))
        return build_trainer(cfg, Path(run_dir), rt, resume=resume, allow_data_change=allow_data_change).fit()
    finally:
        teardown_runtime(rt)
