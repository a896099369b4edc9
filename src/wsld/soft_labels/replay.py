"""Training side of a store: the sampler that asks for stored crop ``epoch mod K``, the dataset that pairs each crop with its record, the collate."""

from __future__ import annotations

import numpy as np
from torch.utils.data import Dataset

from wsld.data.batch import Batch
from wsld.data.sampling import ResumableSampler, sample_seed
from wsld.soft_labels.crops import is_sample
from wsld.soft_labels.store import SoftLabelStore, records_to_tensors


class ReplaySampler(ResumableSampler):
    """``ResumableSampler`` whose epoch ``e`` asks for stored crop ``e mod K``: keys
    ``(index, sample_seed(store_seed, e mod K, index), e mod K)``. The order still shuffles with
    the run's own seed and epoch."""

    def __init__(self, base: ResumableSampler, crops: int, crop_seed: int):
        super().__init__(
            base.num_samples, batch_size=base.batch_size, seed=base.seed, shuffle=base.shuffle, rank=base.rank,
            world_size=base.world_size, pad=base.pad, with_seeds=False,
        )  # fmt: skip
        self.crops, self.crop_seed = crops, crop_seed

    def __iter__(self):
        crop = self.epoch % self.crops
        for i in super().__iter__():  # this epoch's indices (with_seeds=False: plain indices)
            yield (i, sample_seed(self.crop_seed, crop, i), crop)


class ReplayDataset(Dataset):
    """Training items ``(image, label, record)``: the stored crop ``k`` of the image and its record."""

    def __init__(self, dataset: Dataset, store: SoftLabelStore):
        self.dataset, self.store = dataset, store
        self.targets = dataset.targets  # type: ignore[attr-defined]
        self.classes = dataset.classes  # type: ignore[attr-defined]

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key):
        index, seed, crop = int(key[0]), int(key[1]), int(key[2])
        item = self.dataset[(index, seed)]
        if not is_sample(item):
            return item  # a corrupt-sample marker: the collate sets it aside
        return item[0], item[1], self.store.record(index, crop)


def collate_replay(samples: list) -> Batch:
    """A ``Batch`` whose ``teacher_records`` are the good samples' stored records as tensors, in
    the order of ``images`` (corrupt samples are set aside as by the default collate)."""
    from wsld.data.datasets import collate_skip_corrupt

    images, targets, bad = collate_skip_corrupt(samples)  # it reads items 0 and 1 of each sample
    recs = [s[2] for s in samples if isinstance(s, tuple) and len(s) == 3]
    return Batch(images, targets, bad, teacher_records=records_to_tensors(np.concatenate(recs)) if recs else None)
