"""The teacher-source seam: the one interface the training loop asks for teacher logits."""

from __future__ import annotations

from typing import Callable, Optional, Protocol, runtime_checkable

from torch import Tensor, nn
from torch.utils.data import Dataset

from wsld.data.batch import Batch
from wsld.data.sampling import ResumableSampler


@runtime_checkable
class TeacherSource(Protocol):
    """Where a batch's teacher logits come from.

    The trainer picks one source when it is built and never branches on the kind again:
    ``prepare_train_data`` lets the source shape what the loader yields (a stored source replays
    its recorded crops and attaches their records to each ``Batch``), ``logits`` returns the
    teacher's logits for the (already normalised, on-device) images of that batch.
    """

    name: str  # for logs: the model and its weights, or the store's path
    runs_model: bool  # True: a network runs each step (it is evaluated before training)
    model: Optional[nn.Module]  # the live model, None for stored outputs

    def prepare_train_data(
        self, dataset: Dataset, sampler: ResumableSampler
    ) -> tuple[Dataset, ResumableSampler, Callable[[list], Batch]]: ...

    def logits(self, images: Tensor, batch: Optional[Batch]) -> Tensor: ...

    def describe(self) -> dict: ...
