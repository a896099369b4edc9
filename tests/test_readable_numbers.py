"""Numbers that read right: the soft term as a KL beside the reference's form, the batch and lr on the
start line, data.batch_size_per_device, and teacher caches that survive the per-loss parameter change."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from engine_helpers import TINY, digits_teacher, run_cli  # noqa: F401 (fixture)
from wsld.config import load_config
from wsld.errors import UserError
from wsld.losses.registry import DistillLoss


def test_wsld_soft_kl_is_the_soft_term_without_the_teacher_entropy():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(16, 10, generator=g) * 3, torch.randn(16, 10, generator=g) * 3
    y = torch.randint(0, 10, (16,), generator=g)
    loss, parts = DistillLoss("wsld", T=4.0, alpha=2.5)(s, t, y)
    w = parts["sample_weight"]
    kl = F.kl_div(F.log_softmax(s / 4, 1), F.log_softmax(t / 4, 1), reduction="none", log_target=True).sum(1)
    assert parts["soft_kl"].item() == pytest.approx((16 * (w * kl).mean()).item(), rel=1e-5)
    assert 0 < parts["soft_kl"].item() < parts["soft"].item()  # the CE form adds the entropy
    # identical students and teachers: no KL left, while the CE form still reads the entropy
    _, same = DistillLoss("wsld", T=4.0)(t, t, y)
    assert abs(same["soft_kl"].item()) < 1e-5 and same["soft"].item() > 1.0
    assert loss.item() == pytest.approx((parts["hard"] + 2.5 * parts["soft"]).item(), rel=1e-6)  # the loss is unchanged


def test_kd_and_ce_log_soft_kl_too():
    s, t, y = torch.randn(4, 5), torch.randn(4, 5), torch.tensor([0, 1, 2, 3])
    kd = DistillLoss("kd", T=4.0)(s, t, y)[1]
    assert torch.equal(kd["soft_kl"], kd["soft"])
    assert DistillLoss("ce")(s, None, y)[1]["soft_kl"].item() == 0.0


def test_batch_size_per_device_becomes_the_global_batch(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "8")
    d = load_config(None, ["data.batch_size_per_device=32"]).data
    assert (d.batch_size, d.batch_size_per_device) == (256, None)  # what the run records
    assert load_config(None, ["data.batch_size_per_device=32", "data.batch_size=256"]).data.batch_size == 256
    with pytest.raises(UserError, match="data.batch_size.*data.batch_size_per_device.*32 x 8 processes = 256.*one of the two"):
        load_config(None, ["data.batch_size_per_device=32", "data.batch_size=64"])
    with pytest.raises(UserError, match="data.batch_size_per_device.*must be in \\[1, "):
        load_config(None, ["data.batch_size_per_device=0"])
    monkeypatch.delenv("WORLD_SIZE")
    assert load_config(None, ["data.batch_size_per_device=32"]).data.batch_size == 32


def test_start_line_names_per_device_and_global_batch_and_the_lr(tmp_path, digits_teacher):
    rc, _, err = run_cli(["train", *TINY, "train.epochs=1", f"model.teacher_weights={digits_teacher}",
                          "data.batch_size=128", "train.lr=0.1", "--out", str(tmp_path / "run")])
    assert rc == 0, err
    assert "batch 128 per device x 1 = 128 global; lr 0.2 (train.lr 0.1 for a global batch of train.base_batch_size 64" in err
    train = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in train if r["kind"] == "train"]
    assert train and all(0 < r["soft_kl"] < r["soft"] for r in train)  # logged beside the reference's form


def test_teacher_cache_key_ignores_what_does_not_change_the_teacher():
    """Per-loss parameters and data.batch_size_per_device leave the key alone; the data's identity
    and the teacher's recipe change it. (Compared key with key: a hash stored from an earlier
    release breaks each time a config key is added, and since the data's identity joined the key,
    entries cached by releases before it are retrained once.)"""
    from wsld.teachers.training import teacher_cache_key

    base = teacher_cache_key(load_config(None), "data-a")
    assert teacher_cache_key(load_config(None, ["distill.loss=kd", "distill.params.kd.alpha=0.5"]), "data-a") == base
    per_device = f"data.batch_size_per_device={load_config(None).data.batch_size}"  # the same global batch
    assert teacher_cache_key(load_config(None, [per_device]), "data-a") == base
    assert teacher_cache_key(load_config(None), "data-b") != base
    assert teacher_cache_key(load_config(None, ["teacher_train.lr=0.05"]), "data-a") != base
