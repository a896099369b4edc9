"""``dkd``: Decoupled Knowledge Distillation (Zhao et al., CVPR 2022; docs/method.md).

KD's KL split into a target-class term (TCKD, the binary target / non-target distributions) and a
non-target term (NCKD, the distribution over the other classes), weighted separately. Float32 maths;
log-probabilities come from log-sum-exps, never from ``log(softmax)``, so near-one-hot outputs stay finite.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def _binary_log_probs(z: Tensor, target_mask: Tensor) -> Tensor:
    """``log [p_y, 1 - p_y]`` of ``softmax(z)`` per row, shape (N, 2)."""
    lse = torch.logsumexp(z, dim=1)
    log_p_target = z.masked_select(target_mask) - lse
    log_p_rest = torch.logsumexp(z.masked_fill(target_mask, float("-inf")), dim=1) - lse
    return torch.stack([log_p_target, log_p_rest], dim=1)


def _non_target_log_probs(z: Tensor, target_mask: Tensor) -> Tensor:
    """``log_softmax`` over the C - 1 non-target logits of each row, shape (N, C - 1)."""
    n, c = z.shape
    return F.log_softmax(z.masked_select(~target_mask).view(n, c - 1), dim=1)


def dkd(
    student_logits: Tensor,
    teacher_logits: Tensor,
    target: Tensor,
    *,
    T: float = 4.0,
    alpha: float = 1.0,
    label_smoothing: float = 0.0,
    beta: float = 8.0,
    ce_weight: float = 1.0,
    warmup_epochs: float = 20.0,
    epoch: float = 0.0,
) -> tuple[Tensor, dict[str, Tensor]]:
    """``ce_weight * CE + min(epoch / warmup_epochs, 1) * (alpha * TCKD + beta * NCKD) * T^2``.

    ``epoch`` is the training progress in (fractional) epochs, so the distillation term ramps up
    linearly from 0 over the first ``warmup_epochs`` (0: no warm-up). Both KLs are batch means.
    """
    s = student_logits.float()
    t = teacher_logits.detach().float()
    hard = F.cross_entropy(s, target, label_smoothing=label_smoothing)
    mask = F.one_hot(target, s.shape[1]).bool()
    s_T, t_T = s / T, t / T
    tckd = F.kl_div(_binary_log_probs(s_T, mask), _binary_log_probs(t_T, mask), reduction="batchmean", log_target=True)
    nckd = F.kl_div(
        _non_target_log_probs(s_T, mask), _non_target_log_probs(t_T, mask), reduction="batchmean", log_target=True
    )
    ramp = min(epoch / warmup_epochs, 1.0) if warmup_epochs > 0 else 1.0
    loss = ce_weight * hard + ramp * (alpha * tckd + beta * nckd) * (T * T)
    return loss, {"hard": hard.detach(), "tckd": tckd.detach(), "nckd": nckd.detach()}
