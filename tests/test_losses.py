"""ce, kd and wsld against an independent float64 implementation written from the paper (docs/method.md)."""

import math

import pytest
import torch

from wsld.losses.ce import ce
from wsld.losses.kd import kd
from wsld.losses.registry import LOSSES, DistillLoss
from wsld.losses.wsld import wsld, wsld_weights


def reference_wsld(s, t, y, T, alpha, ls=0.0):
    """Float64, written from the formula with explicit loops where it helps readability."""
    s, t = s.double(), t.double()
    n, c = s.shape
    total_soft = 0.0
    hard = 0.0
    for i in range(n):
        pt = torch.exp(t[i] / T) / torch.exp(t[i] / T).sum()
        log_ps = s[i] / T - torch.log(torch.exp(s[i] / T).sum())
        soft_i = -(pt * log_ps).sum()
        ce_s = -(s[i, y[i]] - torch.log(torch.exp(s[i]).sum())).detach()
        ce_t = -(t[i, y[i]] - torch.log(torch.exp(t[i]).sum()))
        r = max(float(ce_s / (ce_t + 1e-7)), 0.0)
        w = 1.0 - math.exp(-r)
        total_soft = total_soft + w * soft_i
        log_p = s[i] - torch.log(torch.exp(s[i]).sum())
        target = torch.full((c,), ls / c, dtype=torch.float64)
        target[y[i]] += 1.0 - ls
        hard = hard - (target * log_p).sum()
    soft = T * T * total_soft / n
    return hard / n + alpha * soft


def reference_kd(s, t, y, T, a):
    s, t = s.double(), t.double()
    log_ps = torch.log_softmax(s / T, 1)
    pt = torch.softmax(t / T, 1)
    kl = (pt * (torch.log(pt) - log_ps)).sum(1).mean()
    hard = -torch.log_softmax(s, 1)[torch.arange(len(y)), y].mean()
    return (1 - a) * hard + a * T * T * kl


CASES = [(4, 2, 1.0, 0.5), (8, 10, 2.0, 2.5), (5, 100, 4.0, 2.25), (3, 1000, 3.0, 1.0)]


@pytest.mark.parametrize("n,c,T,alpha", CASES)
@pytest.mark.parametrize("ls", [0.0, 0.1])
def test_wsld_value_and_gradient_match_float64_reference(n, c, T, alpha, ls):
    g = torch.Generator().manual_seed(n * c)
    s0 = torch.randn(n, c, generator=g) * 3
    t = torch.randn(n, c, generator=g) * 3
    y = torch.randint(0, c, (n,), generator=g)
    s = s0.clone().double().requires_grad_(True)
    ref = reference_wsld(s, t, y, T, alpha, ls)
    ref.backward()
    s32 = s0.clone().requires_grad_(True)
    loss, parts = wsld(s32, t, y, T=T, alpha=alpha, label_smoothing=ls)
    loss.backward()
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5, abs=1e-5)
    torch.testing.assert_close(s32.grad.double(), s.grad, rtol=1e-4, atol=1e-6)
    assert set(parts) >= {"hard", "soft", "weight_mean"}
    assert 0.0 <= parts["weight_mean"].item() < 1.0


@pytest.mark.parametrize("n,c,T,a", [(6, 2, 1.0, 0.5), (8, 10, 4.0, 0.9), (4, 1000, 2.0, 0.3)])
def test_kd_matches_hinton_formula(n, c, T, a):
    g = torch.Generator().manual_seed(c)
    s0, t = torch.randn(n, c, generator=g), torch.randn(n, c, generator=g)
    y = torch.randint(0, c, (n,), generator=g)
    s = s0.clone().double().requires_grad_(True)
    ref = reference_kd(s, t, y, T, a)
    ref.backward()
    s32 = s0.clone().requires_grad_(True)
    loss, _ = kd(s32, t, y, T=T, alpha=a)
    loss.backward()
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5)
    torch.testing.assert_close(s32.grad.double(), s.grad, rtol=1e-4, atol=1e-6)


def test_ce_ignores_teacher_and_equals_cross_entropy():
    s = torch.randn(5, 7)
    y = torch.tensor([0, 1, 2, 3, 6])
    loss, parts = ce(s, None, y)
    assert loss.item() == pytest.approx(torch.nn.functional.cross_entropy(s, y).item())
    assert parts["soft"].item() == 0.0


def test_weight_carries_no_gradient_and_uses_untempered_logits():
    s = torch.randn(6, 5, requires_grad=True)
    t = torch.randn(6, 5, requires_grad=True)
    y = torch.randint(0, 5, (6,))
    w = wsld_weights(s, t, y)
    assert not w.requires_grad
    ce_s = torch.nn.functional.cross_entropy(s, y, reduction="none")
    ce_t = torch.nn.functional.cross_entropy(t, y, reduction="none")
    torch.testing.assert_close(w, 1 - torch.exp(-(ce_s / (ce_t + 1e-7)).clamp_min(0)).detach())
    loss, _ = wsld(s, t, y, T=3.0, alpha=1.0)
    loss.backward()
    assert t.grad is None  # the teacher receives no gradient


def test_wsld_weighting_off_equals_cross_entropy_form_kd():
    """``weighting: off`` (every w_i = 1) is ``CE + alpha T^2 softCE`` and has the KL form's gradient."""
    g = torch.Generator().manual_seed(3)
    s, t = torch.randn(7, 11, generator=g), torch.randn(7, 11, generator=g)
    y = torch.randint(0, 11, (7,), generator=g)
    T, alpha = 4.0, 2.25
    loss, parts = wsld(s, t, y, T=T, alpha=alpha, weighting="off")
    soft_ce = -(torch.softmax(t / T, 1) * torch.log_softmax(s / T, 1)).sum(1).mean()
    expected = torch.nn.functional.cross_entropy(s, y) + alpha * T * T * soft_ce
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    assert parts["weight_mean"].item() == 1.0 and torch.equal(parts["sample_weight"], torch.ones(7))
    assert wsld(s, t, y, T=T, alpha=alpha)[0].item() < loss.item()  # the weights (all < 1) do change it
    # cross-entropy form = KL + teacher entropy: same gradient as KL
    s1 = s.clone().requires_grad_(True)
    DistillLoss("wsld", T, alpha, weighting="off")(s1, t, y)[0].backward()
    s2 = s.clone().requires_grad_(True)
    kl = torch.nn.functional.kl_div(torch.log_softmax(s2 / T, 1), torch.softmax(t / T, 1), reduction="batchmean")
    (torch.nn.functional.cross_entropy(s2, y) + alpha * T * T * kl).backward()
    torch.testing.assert_close(s1.grad, s2.grad, rtol=1e-5, atol=1e-7)


def test_weight_is_zero_when_student_is_perfect_and_near_one_when_far_behind():
    y = torch.tensor([0, 0])
    s = torch.tensor([[50.0, 0.0, 0.0], [-20.0, 20.0, 0.0]])
    t = torch.tensor([[5.0, 0.0, 0.0], [5.0, 0.0, 0.0]])
    w = wsld_weights(s, t, y)
    assert w[0].item() < 1e-6
    assert w[1].item() > 0.999


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", sorted(LOSSES))
def test_losses_finite_for_huge_low_precision_logits(dtype, name):
    """Every registered loss (dkd and dist too), with its distillation term fully on."""
    g = torch.Generator().manual_seed(0)
    s = ((torch.rand(16, 50, generator=g) * 2 - 1) * 1e4).to(dtype).requires_grad_(True)
    t = ((torch.rand(16, 50, generator=g) * 2 - 1) * 1e4).to(dtype)
    y = torch.randint(0, 50, (16,), generator=g)
    m = DistillLoss(name, 2.0, 0.5)
    m.set_epoch(1e6)  # past any warm-up
    loss, parts = m(s, t, y)
    loss.backward()
    assert torch.isfinite(loss)
    assert torch.isfinite(s.grad.float()).all()
    assert all(torch.isfinite(v).all() for v in parts.values())


def test_number_of_classes_comes_from_logits():
    for c in (2, 3, 17, 1000):
        s, t = torch.randn(4, c), torch.randn(4, c)
        y = torch.randint(0, c, (4,))
        loss, _ = wsld(s, t, y)
        assert torch.isfinite(loss)


def test_module_wrapper_binds_hyper_parameters():
    s, t = torch.randn(4, 6), torch.randn(4, 6)
    y = torch.randint(0, 6, (4,))
    m = DistillLoss("wsld", T=2.0, alpha=2.5)
    assert m(s, t, y)[0].item() == pytest.approx(wsld(s, t, y, T=2.0, alpha=2.5)[0].item())
    assert not DistillLoss("ce").needs_teacher
