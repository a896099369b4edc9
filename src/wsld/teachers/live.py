"""The live teacher: a network run under no_grad in the step, in eval or the reference's batch-statistics BatchNorm mode."""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from wsld.data.batch import Batch, collate_batch
from wsld.data.sampling import ResumableSampler
from wsld.runtime import autocast


def set_teacher_bn_mode(teacher: nn.Module, mode: str) -> None:
    """``eval``: running statistics. ``train``: batch statistics (reference), running stats frozen."""
    teacher.eval()
    if mode == "train":
        for m in teacher.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.train()
                m.momentum = 0.0  # use batch statistics, never move the stored ones
    for p in teacher.parameters():
        p.requires_grad_(False)


class LiveTeacher:
    """A teacher network called by the step: no autograd graph, never wrapped in DDP, never
    updated. ``forward`` may be a compiled version of ``model``."""

    runs_model = True

    def __init__(self, model: nn.Module, *, name: str = "teacher", weights: Optional[str] = None,
                 bn_mode: Optional[str] = "eval", amp_dtype: Optional[torch.dtype] = None,
                 forward: Optional[Callable[[Tensor], Tensor]] = None):  # fmt: skip
        self.model = model
        self.name = name
        self.weights = weights
        self.bn_mode = bn_mode
        self.amp_dtype = amp_dtype
        self.forward = forward if forward is not None else model  # not `or`: a compiled module has no len()
        if bn_mode is not None:  # None: keep the module's current mode (a caller that set it already)
            set_teacher_bn_mode(model, bn_mode)

    def prepare_train_data(self, dataset: Dataset, sampler: ResumableSampler) -> tuple[Dataset, ResumableSampler, Callable[[list], Batch]]:
        return dataset, sampler, collate_batch

    def logits(self, images: Tensor, batch: Optional[Batch] = None) -> Tensor:
        with torch.no_grad(), autocast(images.device, self.amp_dtype):
            return self.forward(images)

    def describe(self) -> dict:
        return {"teacher": self.name, "teacher_weights": self.weights, "teacher_bn_mode": self.bn_mode}
