"""Every registered loss trains through the engine and logs its own parts, named by the loss (the engine names none)."""

from __future__ import annotations

import json

import pytest
from engine_helpers import TINY, digits_teacher  # noqa: F401

from wsld.cli import main
from wsld.losses.registry import LOSSES


@pytest.mark.parametrize("loss, extra", [("dkd", ["distill.T=4", "distill.alpha=1.0", "distill.params={beta: 8.0, warmup_epochs: 1}"]),
                                         ("dist", ["distill.T=1"])])  # fmt: skip
def test_dkd_and_dist_train_and_log_their_own_parts(digits_teacher, tmp_path, loss, extra):  # noqa: F811
    run = tmp_path / "run"
    rc = main(["train", "configs/digits_wsld.yaml", *TINY[:4], "train.epochs=1", "train.log_every=2", f"distill.loss={loss}",
               *extra, f"model.teacher_weights={digits_teacher}", "--out", str(run)])  # fmt: skip
    assert rc == 0
    recs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in recs if r["kind"] == "train"]
    assert train and all(set(LOSSES[loss].parts) <= set(r) for r in train)
    assert "weight_mean" not in train[0] and not [r for r in recs if r["kind"] == "class_weights"]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["loss"] == loss and summary["skipped_steps"] == 0
    assert all(isinstance(r[k], float) for r in train for k in ("loss", *LOSSES[loss].parts))
