"""The stored form of teacher logits: exact at k = classes whatever the teacher's confidence
(issue 13), what stays exact for k < classes, and stores of format version 1 still read."""

from __future__ import annotations

import json

import lmdb
import numpy as np
import pytest
import torch

from wsld.config import load_config
from wsld.data.build import build_datasets
from wsld.data.sampling import ResumableSampler
from wsld.losses.kd import kd
from wsld.losses.wsld import wsld
from wsld.soft_labels.store import (
    COMPLETE_KEY, FORMAT, META_KEY, SoftLabelStore, crop_data_config, image_key, logits_from_records, record_dtype,
    records_from_logits, records_to_tensors, targets_sha256,
)  # fmt: skip
from wsld.teachers.stored import StoredTeacher

CPU = torch.device("cpu")


def confident_logits(n: int, c: int, margin: float, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Float32 logits whose labelled class is ``margin`` above the best other class."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, c, generator=g) * 2
    y = torch.randint(0, c, (n,), generator=g)
    rows = torch.arange(n)
    z[rows, y] = z.scatter(1, y[:, None], float("-inf")).max(1).values + margin
    return z, y


def rebuilt(z: torch.Tensor, y: torch.Tensor, k: int, precision: str, drop_others: bool = False) -> torch.Tensor:
    """What training rebuilds from the store ``wsld soft-labels`` writes for ``z``."""
    t = records_to_tensors(records_from_logits(z, y, k, precision))
    if drop_others:  # a version-1 record
        t.pop("others_lse")
    return logits_from_records(t, y, z.shape[1], CPU)


@pytest.mark.parametrize("margin", [2, 6, 10, 14, 20, 30])
@pytest.mark.parametrize("classes", [10, 1000])
def test_all_classes_float32_is_exact_for_any_teacher_confidence(margin, classes):
    z, y = confident_logits(32, classes, margin)
    r = rebuilt(z, y, classes, "float32")
    s = torch.randn(32, classes, generator=torch.Generator().manual_seed(1)) * 3
    for T in (1.0, 2.0, 4.0):
        exact, got = torch.softmax(z / T, 1), torch.softmax(r / T, 1)
        assert (got - exact).abs().max() < 1e-6, T  # tempered soft labels (online: 0.23 off at margin 14, T = 1)
        assert torch.allclose(got, exact, rtol=1e-4, atol=1e-30), T  # even the tiny non-target probabilities
        assert (torch.log_softmax(r / T, 1) - torch.log_softmax(z / T, 1)).abs().max() < 2e-5, T
        # the losses: wsld's soft term is a cross-entropy (no cancellation); kd's is a KL divergence,
        # a difference of two float32 sums, so its float32 noise is relatively larger
        for fn, rel in ((wsld, 1e-6), (kd, 2e-5)):
            a, pa = fn(s, z, y, T=T, alpha=2.25)
            b, pb = fn(s, r, y, T=T, alpha=2.25)
            assert b.item() == pytest.approx(a.item(), rel=rel), (fn.__name__, T)
            for key in pa:
                assert torch.allclose(pb[key], pa[key], rtol=1e-5, atol=1e-7), (fn.__name__, T, key)


def test_version_one_records_cancel_for_confident_teachers():
    """What version 2 fixes (and that the test above can fail): v1's mass ``1 - p(y) - tail``."""
    z, y = confident_logits(32, 10, 20)
    old, new = rebuilt(z, y, 10, "float32", drop_others=True), rebuilt(z, y, 10, "float32")
    err = lambda r: (torch.log_softmax(r, 1) - torch.log_softmax(z, 1)).abs().max().item()  # noqa: E731
    assert err(old) > 1.0 and err(new) < 2e-5


@pytest.mark.parametrize("precision,k", [("float32", 5), ("float16", 5), ("float16", 1)])
@pytest.mark.parametrize("margin", [0, 14, 30])
def test_top_k_keeps_the_masses_and_the_teacher_ce(precision, k, margin):
    """Exact (to float32) for any k and precision: log-sum-exp, the labelled class's logit (hence
    CE_teacher and the WSLD weight), the total mass of the unstored and of the other stored classes."""
    C, n = 100, 32
    z, y = confident_logits(n, C, margin, seed=2)
    if margin == 0:
        y[:8] = z[:8].argmax(1)  # some labels among the stored classes, some not
        z = torch.randn(n, C, generator=torch.Generator().manual_seed(3)) * 3
    r = rebuilt(z, y, k, precision)
    rows = torch.arange(n)
    idx = z.topk(k, 1).indices
    lse = torch.logsumexp(z, 1)
    assert torch.allclose(torch.logsumexp(r, 1), lse, atol=1e-5)
    # the labelled logit comes back as lse + log p, a float32 round trip through values up to |lse|
    # (about 15 here): a few ULPs of that, 2e-6 at most, on any CPU's kernels (measured 4.8e-7)
    assert torch.allclose(r[rows, y], z[rows, y], rtol=0, atol=1e-5)
    ce = lambda logits: torch.nn.functional.cross_entropy(logits, y, reduction="none")  # noqa: E731
    assert torch.allclose(ce(r), ce(z), rtol=1e-5, atol=1e-6)  # CE_teacher(y) as the online loss computes it
    stored = torch.zeros(n, C, dtype=torch.bool).scatter_(1, idx, True)
    label = torch.zeros(n, C, dtype=torch.bool)
    label[rows, y] = True
    lp, lp_true = torch.log_softmax(r, 1), torch.log_softmax(z, 1)
    for group in (stored & ~label, ~stored & ~label):  # log of each group's total mass
        has = group.any(1)
        if not has.any():
            continue
        a = torch.logsumexp(lp.masked_fill(~group, float("-inf")), 1)[has]
        b = torch.logsumexp(lp_true.masked_fill(~group, float("-inf")), 1)[has]
        assert (a - b).abs().max() < 2e-5
    # the stored classes as stored (float16: to its rounding, relative in the log-probability)
    tol = 2e-5 if precision == "float32" else 2e-3 * lp_true.gather(1, idx).abs().max().item() + 1e-3
    assert (lp.gather(1, idx) - lp_true.gather(1, idx)).abs().max() < tol
    # the unstored classes share their mass equally
    tail = r.masked_fill(stored | label, float("nan"))
    assert torch.allclose(torch.nanquantile(tail, 0.0, dim=1), torch.nanquantile(tail, 1.0, dim=1))
    for fn in (wsld, kd):  # finite losses (no -inf logits)
        assert torch.isfinite(fn(torch.randn(n, C), r, y, T=4.0, alpha=0.9)[0])


def write_version_one_store(path, cfg, train_ds, logits: torch.Tensor, crops: int) -> None:
    """A store as wsld wrote it before format version 2 (no ``others_lse``), for ``train_ds``."""
    n, c = len(train_ds), logits.shape[1]
    v1 = record_dtype(c, c, "float32", version=1)
    y = torch.as_tensor(np.repeat(np.asarray(train_ds.targets), crops))
    new = records_from_logits(logits, y, c, "float32")
    old = np.zeros(len(new), dtype=v1)
    for name in v1.names:
        old[name] = new[name]
    meta = {
        "format": FORMAT, "version": 1, "crops": crops, "topk": c, "precision": "float32", "num_classes": c,
        "classes": list(train_ds.classes), "count": n, "teacher": "cnn_teacher", "teacher_weights": "w",
        "teacher_sha256": "0", "seed": 0, "data": crop_data_config(cfg.data), "targets_sha256": targets_sha256(train_ds),
        "amp": "None", "record_bytes": v1.itemsize,
    }  # fmt: skip
    env = lmdb.open(str(path), map_size=64 << 20)
    with env.begin(write=True) as txn:
        txn.put(META_KEY, json.dumps(meta).encode())
        for i in range(n):
            txn.put(image_key(i), old[i * crops : (i + 1) * crops].tobytes())
        txn.put(COMPLETE_KEY, json.dumps({"count": n}).encode())
    env.close()


def test_a_version_one_store_still_trains(tmp_path):
    """Through StoredTeacher as the trainer uses it: replayed batches carry v1 records and their
    logits are rebuilt as version 1 did (exact here: a moderately confident teacher)."""
    cfg = load_config(None, ["data.dataset=digits"])
    train, _, info = build_datasets(cfg.data, seed=0)
    crops = 2
    z = torch.randn(len(train) * crops, 10, generator=torch.Generator().manual_seed(4)) * 3
    write_version_one_store(tmp_path / "v1", cfg, train, z, crops)
    teacher = StoredTeacher(tmp_path / "v1", info, cfg.data, print)
    assert teacher.store.version == 1 and "others_lse" not in teacher.store.dtype.names
    sampler = ResumableSampler(len(train), batch_size=64, seed=3, shuffle=True)
    ds, smp, collate = teacher.prepare_train_data(train, sampler)
    smp.set_epoch(1)  # crop 1
    keys = list(smp)[:64]
    batch = collate([ds[k] for k in keys])
    want = z[[k[0] * crops + 1 for k in keys]]
    got = teacher.logits(torch.zeros(len(batch), 1, 8, 8), batch)
    assert "others_lse" not in batch.teacher_records
    assert torch.allclose(got, want, atol=1e-5)
    assert teacher.describe()["teacher"] is None and teacher.runs_model is False


def test_store_of_an_unknown_version_is_refused(tmp_path):
    cfg = load_config(None, ["data.dataset=digits"])
    train, _, _ = build_datasets(cfg.data, seed=0)
    write_version_one_store(tmp_path / "s", cfg, train, torch.zeros(len(train), 10), 1)
    env = lmdb.open(str(tmp_path / "s"))
    with env.begin(write=True) as txn:
        meta = json.loads(txn.get(META_KEY))
        txn.put(META_KEY, json.dumps({**meta, "version": 99}).encode())
    env.close()
    with pytest.raises(Exception, match="store version 99, this wsld reads 1, 2"):
        SoftLabelStore(tmp_path / "s")
