"""``dist``: DIST, distillation from a stronger teacher (Huang et al., NeurIPS 2022; docs/method.md).

Matches relations rather than probabilities: the Pearson correlation of student and teacher
probabilities across classes for each sample (inter-class) and across the batch for each class
(intra-class). Float32 maths.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

PEARSON_EPS = 1e-8  # added to the product of norms, as in the DIST authors' code


def pearson_rows(a: Tensor, b: Tensor) -> Tensor:
    """Pearson correlation of each row of ``a`` with the same row of ``b`` (0 for a constant row)."""
    a = a - a.mean(dim=1, keepdim=True)
    b = b - b.mean(dim=1, keepdim=True)
    return (a * b).sum(dim=1) / (a.norm(dim=1) * b.norm(dim=1) + PEARSON_EPS)


def dist(
    student_logits: Tensor,
    teacher_logits: Tensor,
    target: Tensor,
    *,
    T: float = 1.0,
    label_smoothing: float = 0.0,
    beta: float = 1.0,
    gamma: float = 1.0,
    weight: float = 2.0,
) -> tuple[Tensor, dict[str, Tensor]]:
    """``CE + weight * T^2 * (beta * inter + gamma * intra)`` with ``p = softmax(z / T)``.

    ``inter = 1 - mean_i pearson(p_s[i, :], p_t[i, :])``, ``intra = 1 - mean_c pearson(p_s[:, c], p_t[:, c])``;
    the intra term needs a batch of more than one sample to mean anything.
    """
    s = student_logits.float()
    hard = F.cross_entropy(s, target, label_smoothing=label_smoothing)
    p_s = F.softmax(s / T, dim=1)
    p_t = F.softmax(teacher_logits.detach().float() / T, dim=1)
    inter = 1.0 - pearson_rows(p_s, p_t).mean()
    intra = 1.0 - pearson_rows(p_s.t(), p_t.t()).mean()
    loss = hard + weight * (T * T) * (beta * inter + gamma * intra)
    return loss, {"hard": hard.detach(), "inter": inter.detach(), "intra": intra.detach()}
