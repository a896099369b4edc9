"""Stored soft labels as a teacher source: the recorded crops are replayed and each batch's teacher logits rebuilt from its records."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional, Sequence

from torch import Tensor
from torch.utils.data import Dataset

from wsld.data import DataInfo
from wsld.data.batch import Batch
from wsld.data.identity import check_identity
from wsld.data.sampling import ResumableSampler
from wsld.soft_labels.replay import ReplayDataset, ReplaySampler, collate_replay
from wsld.soft_labels.store import SoftLabelStore, logits_from_records


class StoredTeacher:
    """The teacher of a ``wsld soft-labels`` store: no network runs.

    ``prepare_train_data`` checks the store against the training split (classes, count, labels
    and the ``data`` keys that shape a crop) and returns the replay dataset, sampler and collate,
    so that epoch ``e`` sees stored crop ``e mod K`` and each ``Batch`` carries its records;
    ``logits`` rebuilds the (N, C) float32 teacher logits of a batch from those records.
    """

    runs_model = False
    model = None

    def __init__(self, path: str | Path, info: DataInfo, data_cfg, log: Callable[[str], None]):
        """``data_cfg``: the run's ``data`` config section (its crop keys must match the store's);
        ``info``: the data's classes and identity. Refuses (``UserError``/``DataError``) a missing,
        incomplete or unreadable store, or one made for other classes."""
        self.store = SoftLabelStore(path)
        self.store.check_classes(list(info.classes))
        self.num_classes = int(info.num_classes)
        self.info, self.data_cfg, self.log = info, data_cfg, log
        self.name = f"outputs stored in {self.store.path} (no teacher model)"

    def prepare_train_data(self, dataset: Dataset, sampler: ResumableSampler) -> tuple[Dataset, ResumableSampler, Callable[[list], Batch]]:
        self.store.check_data(self.data_cfg, dataset)
        if self.info.identity is not None:  # stores made before wsld recorded the data's identity have none
            path = self.store.path
            check_identity(self.store.meta.get("data_identity"), self.info.identity, splits=("train",),
                           refusal=f"distill.soft_labels: {path} was made from other data: {{diff}}; remake it from this data "
                           "with wsld soft-labels", subject=f"soft labels {path}", allow=self.info.allow_data_change, say=self.log)  # fmt: skip
        replay_sampler = ReplaySampler(sampler, self.store.crops, int(self.store.meta["seed"]))
        return ReplayDataset(dataset, self.store), replay_sampler, collate_replay

    def logits(self, images: Tensor, batch: Optional[Batch]) -> Tensor:
        if batch is None or batch.teacher_records is None:
            raise RuntimeError("stored soft labels need the batch's records: build the loader with prepare_train_data")
        return logits_from_records(batch.teacher_records, batch.targets, self.num_classes, images.device)

    def describe(self) -> dict:
        return {"teacher": None, "soft_labels": str(self.store.path), "soft_labels_teacher": self.store.meta["teacher"]}


def open_stored_teacher(cfg, info: DataInfo, log: Callable[[str], None]) -> StoredTeacher:
    """The run's ``distill.soft_labels`` store as its teacher source."""
    return StoredTeacher(cfg.distill.soft_labels, info, cfg.data, log)
