"""dkd (Decoupled KD) against an independent float64 implementation written from the paper (docs/method.md)."""

import math

import pytest
import torch

from wsld.losses.dkd import dkd
from wsld.losses.registry import DistillLoss


def reference_dkd(s, t, y, *, T, alpha, beta, ce_weight, warmup, epoch, ls=0.0):
    """Float64, one sample at a time: binary (target / rest) and non-target distributions by hand."""
    s, t = s.double(), t.double()
    n, c = s.shape
    tckd = nckd = hard = 0.0
    for i in range(n):
        p_s = torch.exp(s[i] / T) / torch.exp(s[i] / T).sum()
        p_t = torch.exp(t[i] / T) / torch.exp(t[i] / T).sum()
        yi = int(y[i])
        b_s = torch.stack([p_s[yi], 1 - p_s[yi]])
        b_t = torch.stack([p_t[yi], 1 - p_t[yi]])
        tckd = tckd + (b_t * torch.log(b_t / b_s)).sum()
        rest = [j for j in range(c) if j != yi]
        q_s = p_s[rest] / p_s[rest].sum()
        q_t = p_t[rest] / p_t[rest].sum()
        nckd = nckd + (q_t * torch.log(q_t / q_s)).sum()
        log_p = s[i] - torch.log(torch.exp(s[i]).sum())
        smooth = torch.full((c,), ls / c, dtype=torch.float64)
        smooth[yi] += 1.0 - ls
        hard = hard - (smooth * log_p).sum()
    ramp = min(epoch / warmup, 1.0) if warmup > 0 else 1.0
    return ce_weight * hard / n + ramp * (alpha * tckd / n + beta * nckd / n) * T * T, tckd / n, nckd / n


CASES = [  # n, c, T, alpha, beta, ce_weight, warmup, epoch
    (4, 2, 1.0, 0.5, 0.5, 1.0, 1.0, 0.3),  # two classes: the non-target distribution is one point, NCKD = 0
    (8, 10, 4.0, 1.0, 8.0, 1.0, 20.0, 25.0),
    (5, 100, 4.0, 1.0, 2.0, 0.5, 20.0, 7.5),
    (3, 1000, 1.0, 0.5, 0.5, 1.0, 0.0, 0.0),  # no warm-up: full weight from the start
]


@pytest.mark.parametrize("n,c,T,alpha,beta,ce_weight,warmup,epoch", CASES)
@pytest.mark.parametrize("ls", [0.0, 0.1])
def test_dkd_value_parts_and_gradient_match_float64_reference(n, c, T, alpha, beta, ce_weight, warmup, epoch, ls):
    g = torch.Generator().manual_seed(n * c)
    s0, t = torch.randn(n, c, generator=g) * 3, torch.randn(n, c, generator=g) * 3
    y = torch.randint(0, c, (n,), generator=g)
    s = s0.clone().double().requires_grad_(True)
    ref, ref_tckd, ref_nckd = reference_dkd(s, t, y, T=T, alpha=alpha, beta=beta, ce_weight=ce_weight, warmup=warmup, epoch=epoch, ls=ls)
    ref.backward()
    s32 = s0.clone().requires_grad_(True)
    loss, parts = dkd(s32, t, y, T=T, alpha=alpha, beta=beta, ce_weight=ce_weight, warmup_epochs=warmup, epoch=epoch, label_smoothing=ls)
    loss.backward()
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5, abs=1e-5)
    torch.testing.assert_close(s32.grad.double(), s.grad, rtol=1e-4, atol=1e-6)
    assert set(parts) == {"hard", "tckd", "nckd"}
    assert parts["tckd"].item() == pytest.approx(ref_tckd.item(), rel=1e-4, abs=1e-6)
    assert parts["nckd"].item() == pytest.approx(ref_nckd.item(), rel=1e-4, abs=1e-6)
    if c == 2:
        assert parts["nckd"].item() == pytest.approx(0.0, abs=1e-6)


def test_dkd_decomposes_kd_kl_for_one_sample():
    """The paper's identity: KL(p_t || p_s) = TCKD + (1 - p_t[y]) * NCKD."""
    g = torch.Generator().manual_seed(1)
    s, t, y = torch.randn(1, 9, generator=g), torch.randn(1, 9, generator=g), torch.tensor([4])
    _, parts = dkd(s, t, y, T=2.0, alpha=1.0, beta=1.0, epoch=1e9)
    p_s, p_t = torch.softmax(s / 2, 1), torch.softmax(t / 2, 1)
    kl = (p_t * (p_t.log() - p_s.log())).sum()
    assert (parts["tckd"] + (1 - p_t[0, 4]) * parts["nckd"]).item() == pytest.approx(kl.item(), rel=1e-5)


def test_warm_up_ramps_the_distillation_term_with_the_epoch_the_module_is_given():
    g = torch.Generator().manual_seed(2)
    s, t = torch.randn(6, 7, generator=g), torch.randn(6, 7, generator=g)
    y = torch.randint(0, 7, (6,), generator=g)
    m = DistillLoss("dkd", 4.0, 1.0, beta=8.0, ce_weight=0.5, warmup_epochs=20)
    loss0, parts = m(s, t, y)  # never told the epoch: the start of training
    assert loss0.item() == pytest.approx(0.5 * parts["hard"].item(), rel=1e-6)
    full = (1.0 * parts["tckd"] + 8.0 * parts["nckd"]).item() * 16
    for epoch, ramp in [(5.0, 0.25), (10.0, 0.5), (20.0, 1.0), (37.5, 1.0)]:
        m.set_epoch(epoch)
        assert m(s, t, y)[0].item() == pytest.approx(0.5 * parts["hard"].item() + ramp * full, rel=1e-5)
    m0 = DistillLoss("dkd", 4.0, 1.0, beta=8.0, ce_weight=0.5, warmup_epochs=0)
    assert m0(s, t, y)[0].item() == pytest.approx(0.5 * parts["hard"].item() + full, rel=1e-5)


def test_dkd_teacher_gets_no_gradient_and_one_hot_outputs_stay_finite():
    s = torch.tensor([[30.0, -30.0, 0.0], [0.0, 0.0, 0.0]], requires_grad=True)
    t = torch.tensor([[80.0, -80.0, 0.0], [-80.0, 80.0, 0.0]], requires_grad=True)  # p_t[y] = 1 to float32
    loss, parts = dkd(s, t, torch.tensor([0, 0]), T=1.0, alpha=0.5, beta=0.5, epoch=1.0, warmup_epochs=1.0)
    loss.backward()
    assert t.grad is None
    assert math.isfinite(loss.item()) and torch.isfinite(s.grad).all()
    assert all(math.isfinite(v.item()) for v in parts.values())
