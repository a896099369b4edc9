"""data.decode=gpu's stream discipline and batched resize: watched on the CPU through the ``streams`` seam, and the memory hazard on CUDA."""

from __future__ import annotations

from contextlib import contextmanager

import numpy as np
import pytest
import torch
import torchvision.io

from test_gpu_decode import DEVICE_FILES, RAW, SIZE, _datasets, _paths, root  # noqa: F401  (root: the photo tree fixture)
from wsld.data.batch import Batch
from wsld.data.gpu_decode import EncodedPhotoDataset, GpuDecoder, collate_encoded
from wsld.data.prefetch import prefetch
from wsld.data.resize import crop_resize, crop_resize_one
from wsld.data.sampling import sample_seed


class RecordingStreams:
    """The ``Streams`` seam with named streams, logging every call (no ``synchronize``: calling it fails)."""

    def __init__(self) -> None:
        self.log: list[tuple] = []
        self.made = 0
        self._current = "train"

    def new(self) -> str:
        self.made += 1
        return f"s{self.made}"

    def current(self) -> str:
        return self._current

    @contextmanager
    def use(self, stream: str):
        before, self._current = self._current, stream
        self.log.append(("enter", stream))
        try:
            yield
        finally:
            self._current = before
            self.log.append(("exit", stream))

    def wait(self, waiter: str, producer: str) -> None:
        self.log.append(("wait", waiter, producer))

    def keep_for(self, tensor: torch.Tensor, stream: str) -> None:
        self.log.append(("keep", tensor.data_ptr(), stream))


def _device_batch(root, seeds=(3, 4)):  # noqa: F811
    train, _ = _datasets(root)
    paths = _paths(train)
    enc = EncodedPhotoDataset(train)
    return collate_encoded([enc[(i, sample_seed(s, 0, i))] for s in seeds for i in range(len(train)) if paths[i] in DEVICE_FILES])


def test_decoding_runs_alone_on_its_stream_and_is_handed_over(root, monkeypatch):  # noqa: F811
    streams = RecordingStreams()
    real = torchvision.io.decode_jpeg
    decoded: list[int] = []

    def watched(data, *a, **kw):
        streams.log.append(("decode", streams.current()))
        out = real(data, *a, **kw)
        decoded.extend(t.data_ptr() for t in (out if isinstance(out, list) else [out]))
        return out

    monkeypatch.setattr(torchvision.io, "decode_jpeg", watched)
    batch = _device_batch(root)
    got = GpuDecoder(*RAW, SIZE, "cpu", streams=streams)(batch)
    monkeypatch.setattr(torchvision.io, "decode_jpeg", real)
    plain = GpuDecoder(*RAW, SIZE, "cpu")(batch)
    assert torch.equal(got.images, plain.images)  # the discipline changes where work runs, not what it computes
    log = streams.log
    assert log[0] == ("enter", "s1") and log[1] == ("decode", "s1") and log[2] == ("exit", "s1"), log[:4]
    assert [e for e in log if e[0] == "decode"] == [("decode", "s1")], "decoding ran elsewhere than on its own stream"
    assert [e for e in log if e[0] == "enter"] == [("enter", "s1")], "the decode stream got other work"
    assert log[3] == ("wait", "train", "s1"), "the consumer's stream must wait for the decode"
    kept = [e[1] for e in log[4:] if e[0] == "keep" and e[2] == "train"]
    assert sorted(kept) == sorted(decoded) and len(kept) == len(batch), "every decoded image is kept for the consumer's stream"


def test_prefetch_prepares_one_batch_ahead_on_a_side_stream_and_hands_it_over():
    streams = RecordingStreams()
    batches = [Batch(torch.full((2, 3, 4, 4), k, dtype=torch.uint8), torch.tensor([k, k])) for k in range(4)]

    def prepare(b: Batch) -> Batch:
        k = int(b.targets[0])
        streams.log.append(("prepare", k, streams.current()))
        return Batch(b.images.float() + 0.5, b.targets)

    seen = []
    for b in prefetch(batches, prepare, torch.device("cpu"), streams=streams):
        k = int(b.targets[0])
        streams.log.append(("step", k))
        seen.append(b)
    assert [int(b.targets[0]) for b in seen] == [0, 1, 2, 3]
    assert all(torch.equal(b.images, batches[k].images.float() + 0.5) for k, b in enumerate(seen))
    log = [e for e in streams.log if e[0] != "keep"]
    assert all(e[2] == "s1" for e in log if e[0] == "prepare"), "preparation must run on the side stream"
    order = [e[:2] if e[0] in ("prepare", "step") else e for e in log if e[0] in ("prepare", "step", "wait")]
    for k in range(4):
        i_prep, i_step = order.index(("prepare", k)), order.index(("step", k))
        waits = [i for i, e in enumerate(order) if e == ("wait", "train", "s1") and i_prep < i < i_step]
        assert waits, f"batch {k}: the training stream did not wait for its preparation"
        if k < 3:  # one ahead: the next batch is queued before this one's step
            assert order.index(("prepare", k + 1)) < i_step
            # and the wait for this batch came before the next one was queued (so the step waits for its own batch only)
            assert waits[0] < order.index(("prepare", k + 1))
    keeps = [e for e in streams.log if e[0] == "keep"]
    assert {e[1] for e in keeps} >= {b.images.data_ptr() for b in seen} and all(e[2] == "train" for e in keeps)


def test_prefetch_raises_a_batchs_error_after_the_previous_step():
    def prepare(b: Batch) -> Batch:
        if int(b.targets[0]) == 2:
            raise ValueError("bad batch 2")
        return b

    streams, done = RecordingStreams(), []
    batches = [Batch(torch.zeros(1, 3, 2, 2), torch.tensor([k])) for k in range(4)]
    with pytest.raises(ValueError, match="bad batch 2"):
        for b in prefetch(batches, prepare, torch.device("cpu"), streams=streams):
            done.append(int(b.targets[0]))
    assert done == [0, 1]


def test_batched_crop_resize_is_the_per_image_path(root):  # noqa: F811
    # float32 products summed in another order than F.interpolate's: measured 5e-5 grey levels at
    # most; after rounding to whole grey levels a value at .5 may land on the other side (1 level)
    batch = _device_batch(root, seeds=(1, 2, 3))
    dec = GpuDecoder(*RAW, SIZE, "cpu")
    imgs = dec._decode(batch.encoded, [(int(p[7]), int(p[8])) for p in batch.encoded.plans.numpy()])
    rng = np.random.default_rng(0)
    checked = 0
    for img, plan in zip(imgs, batch.encoded.plans.numpy()):
        H, W = img.shape[-2:]
        plans = [plan]  # the train crop the workers drew, then: flipped, the whole image, upsampled, val-style sizes
        plans.append([*plan[:6], 1 - plan[6], H, W])
        plans.append([0, 0, H, W, SIZE, SIZE, 0, H, W])
        h, w = int(rng.integers(4, 12)), int(rng.integers(4, 12))
        plans.append([int(rng.integers(0, H - h)), int(rng.integers(0, W - w)), h, w, SIZE, SIZE, 1, H, W])
        plans.append([0, 0, H, W, SIZE + 9, SIZE + 30, 0, H, W])  # resize then centre crop
        plans.append([0, 0, H, W, SIZE - 10, SIZE - 3, 0, H, W])  # smaller than SIZE: zero padding
        p = np.array(plans, dtype=np.int64)
        got = crop_resize([img] * len(p), p, SIZE)
        ref = torch.stack([crop_resize_one(img, q, SIZE) for q in p])
        assert (got - ref).abs().max() < 1e-3
        moved = (got.round() - ref.round()).abs()
        assert moved.max() <= 1 and moved.mean() < 1e-3
        checked += len(p)
    assert checked >= 6 * len(DEVICE_FILES)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_device_decode_never_writes_memory_that_queued_work_still_reads(root):  # noqa: F811
    # The hazard (nvJPEG's hardware decoder writing before the work queued on its stream has run):
    # long work is queued on the training stream, then reads buffers shaped like the decoded images,
    # which are freed at once, so the caching allocator would hand their blocks to the next
    # allocation on that stream; decoding must touch neither those reads nor its own output.
    dev = torch.device("cuda")
    batch = _device_batch(root)
    decoder = GpuDecoder(*RAW, SIZE, dev)
    expected = decoder(batch).images.clone()
    torch.cuda.synchronize()
    sizes = [(int(p[7]), int(p[8])) for p in batch.encoded.plans.numpy()]
    for trial in range(5):
        bufs = [torch.full((3, h, w), 7, dtype=torch.uint8, device=dev) for h, w in sizes]
        spin = torch.randn(4096, 4096, device=dev)
        for _ in range(30):  # tens of milliseconds queued ahead of the reads
            spin = torch.tanh(spin @ spin)
        sums = torch.stack([b.sum(dtype=torch.int64) for b in bufs])  # run after the spin: stream order
        del bufs
        got = decoder(batch).images
        torch.cuda.synchronize()
        assert torch.equal(sums.cpu(), torch.tensor([7 * 3 * h * w for h, w in sizes])), f"trial {trial}: queued reads saw decoded data"
        assert torch.equal(got, expected), f"trial {trial}: decoded images differ from an idle device's"
