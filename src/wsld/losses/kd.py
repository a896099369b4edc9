"""``kd``: Hinton et al.'s knowledge distillation, ``(1 - alpha) * CE + alpha * T^2 * KL(p_t^T || p_s^T)``."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor


def kd(
    student_logits: Tensor,
    teacher_logits: Tensor,
    target: Tensor,
    *,
    T: float = 4.0,
    alpha: float = 0.9,
    label_smoothing: float = 0.0,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Hinton KD with the KL averaged over the batch; ``alpha`` is a mixing weight in [0, 1] (float32 maths)."""
    s = student_logits.float()
    hard = F.cross_entropy(s, target, label_smoothing=label_smoothing)
    log_p_s = F.log_softmax(s / T, dim=1)
    log_p_t = F.log_softmax(teacher_logits.detach().float() / T, dim=1)
    kl = F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True)
    soft = (T * T) * kl
    loss = (1.0 - alpha) * hard + alpha * soft
    soft = soft.detach()  # already a KL: soft_kl is the same number, logged so kd and wsld logs line up
    return loss, {"hard": hard.detach(), "soft": soft, "soft_kl": soft, "weight_mean": hard.new_ones(())}
