"""Evaluation: top-1/top-5 and per-class accuracy of a model on a loader, summed over all ranks."""

from __future__ import annotations

import os
import time
from typing import Any, Optional

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader

from wsld.data.batch import Batch
from wsld.engine.step import BatchNormalizer
from wsld.runtime import Runtime, autocast

# test hook: WSLD_TEST_SLOW_EVAL=<seconds> sleeps before each eval batch, so a test can kill a run
# during evaluation (tests/test_reliability_resume.py)
SLOW_EVAL_ENV = "WSLD_TEST_SLOW_EVAL"


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: DataLoader,
    normalize: BatchNormalizer,  # or a GpuDecoder: anything with prepare(Batch) -> Batch on the device
    num_classes: int,
    rt: Runtime,
    amp_dtype: Optional[torch.dtype] = None,
    progress: bool = False,
    desc: str = "eval",
) -> dict[str, Any]:
    """Top-1/top-5 (%) and per-class accuracy, summed over all ranks."""
    from tqdm import tqdm

    was_training = model.training
    model.eval()
    dev = normalize.device
    correct1 = torch.zeros(num_classes, device=dev, dtype=torch.float64)
    correct5 = torch.zeros((), device=dev, dtype=torch.float64)
    total = torch.zeros(num_classes, device=dev, dtype=torch.float64)
    loss_sum = torch.zeros((), device=dev, dtype=torch.float64)
    pause_s = float(os.environ.get(SLOW_EVAL_ENV) or 0)
    for item in tqdm(loader, desc=desc, leave=False, disable=not progress, mininterval=1.0):
        if pause_s > 0:
            time.sleep(pause_s)
        batch = normalize.prepare(item if isinstance(item, Batch) else Batch(*item))
        if len(batch) == 0:
            continue
        x = batch.images
        y = batch.targets.to(dev, non_blocking=True)
        with autocast(dev, amp_dtype):
            logits = model(x)
        logits = logits.float()
        loss_sum += torch.nn.functional.cross_entropy(logits, y, reduction="sum").double()
        k = min(5, logits.shape[1])
        top = logits.topk(k, dim=1).indices
        hit1 = (top[:, 0] == y).double()
        correct1.index_add_(0, y, hit1)
        correct5 += (top == y[:, None]).any(dim=1).double().sum()
        total.index_add_(0, y, torch.ones_like(hit1))
    if rt.distributed:
        for t in (correct1, correct5, total, loss_sum):
            dist.all_reduce(t)
    model.train(was_training)
    n = float(total.sum().item())
    per_class = (correct1 / total.clamp_min(1)).cpu().tolist()
    return {
        "top1": 100.0 * float(correct1.sum().item()) / max(n, 1.0),
        "top5": 100.0 * float(correct5.item()) / max(n, 1.0),
        "loss": float(loss_sum.item()) / max(n, 1.0),
        "per_class_top1": [100.0 * v for v in per_class],
        "count": int(n),
    }
