"""dist (DIST) against an independent float64 implementation written from the paper (docs/method.md)."""

import math

import pytest
import torch

from wsld.losses.dist import dist


def pearson(a, b, eps=1e-8):
    """Float64 Pearson correlation of two vectors, written out; eps on the denominator as the DIST code."""
    a, b = a - a.sum() / len(a), b - b.sum() / len(b)
    return (a * b).sum() / (torch.sqrt((a * a).sum()) * torch.sqrt((b * b).sum()) + eps)


def reference_dist(s, t, y, *, T, beta, gamma, weight, ls=0.0):
    s, t = s.double(), t.double()
    n, c = s.shape
    p_s = torch.stack([torch.exp(s[i] / T) / torch.exp(s[i] / T).sum() for i in range(n)])
    p_t = torch.stack([torch.exp(t[i] / T) / torch.exp(t[i] / T).sum() for i in range(n)])
    inter = 1 - sum(pearson(p_s[i], p_t[i]) for i in range(n)) / n
    intra = 1 - sum(pearson(p_s[:, k], p_t[:, k]) for k in range(c)) / c
    hard = 0.0
    for i in range(n):
        smooth = torch.full((c,), ls / c, dtype=torch.float64)
        smooth[int(y[i])] += 1.0 - ls
        hard = hard - (smooth * (s[i] - torch.log(torch.exp(s[i]).sum()))).sum()
    return hard / n + weight * T * T * (beta * inter + gamma * intra), inter, intra


CASES = [(4, 2, 1.0, 1.0, 1.0, 2.0), (8, 10, 4.0, 1.0, 2.0, 1.0), (16, 100, 1.0, 2.0, 0.5, 2.0), (3, 1000, 2.0, 1.0, 1.0, 2.0)]


@pytest.mark.parametrize("n,c,T,beta,gamma,weight", CASES)
@pytest.mark.parametrize("ls", [0.0, 0.1])
def test_dist_value_parts_and_gradient_match_float64_reference(n, c, T, beta, gamma, weight, ls):
    g = torch.Generator().manual_seed(n + c)
    s0, t = torch.randn(n, c, generator=g) * 2, torch.randn(n, c, generator=g) * 2
    y = torch.randint(0, c, (n,), generator=g)
    s = s0.clone().double().requires_grad_(True)
    ref, ref_inter, ref_intra = reference_dist(s, t, y, T=T, beta=beta, gamma=gamma, weight=weight, ls=ls)
    ref.backward()
    s32 = s0.clone().requires_grad_(True)
    loss, parts = dist(s32, t, y, T=T, beta=beta, gamma=gamma, weight=weight, label_smoothing=ls)
    loss.backward()
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5, abs=1e-5)
    torch.testing.assert_close(s32.grad.double(), s.grad, rtol=1e-3, atol=1e-6)
    assert set(parts) == {"hard", "inter", "intra"}
    assert parts["inter"].item() == pytest.approx(ref_inter.item(), rel=1e-4, abs=1e-6)
    assert parts["intra"].item() == pytest.approx(ref_intra.item(), rel=1e-4, abs=1e-6)


def test_dist_is_cross_entropy_when_the_student_matches_the_teacher_up_to_a_shift():
    """Softmax ignores a per-row shift; Pearson then sees identical rows and columns: inter = intra = 0."""
    g = torch.Generator().manual_seed(5)
    t = torch.randn(6, 8, generator=g)
    s = t + torch.randn(6, 1, generator=g)
    y = torch.randint(0, 8, (6,), generator=g)
    loss, parts = dist(s, t, y, T=1.0)
    assert parts["inter"].item() == pytest.approx(0.0, abs=1e-5)
    assert parts["intra"].item() == pytest.approx(0.0, abs=1e-5)
    assert loss.item() == pytest.approx(torch.nn.functional.cross_entropy(s, y).item(), abs=1e-4)


def test_dist_batch_of_one_is_finite_and_teacher_gets_no_gradient():
    """One sample: every class's column is constant (Pearson 0 by the epsilon), gradients stay finite."""
    s = torch.randn(1, 5, requires_grad=True)
    t = torch.randn(1, 5, requires_grad=True)
    loss, parts = dist(s, t, torch.tensor([2]), T=1.0)
    loss.backward()
    assert parts["intra"].item() == pytest.approx(1.0)
    assert math.isfinite(loss.item()) and torch.isfinite(s.grad).all()
    assert t.grad is None
