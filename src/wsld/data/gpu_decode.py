"""Device JPEG decoding (``data.decode=gpu``): workers read bytes and draw crops, the device decodes and crops.

Why: a CPU core decodes about 400 photo JPEGs/s with RandomResizedCrop, far below what one GPU
trains on. Here the loader workers only read each sample's encoded bytes and draw its crop box
and flip from the same per-sample generator as the CPU path (``TrainTransform.crop_box``), so
crops stay identical to the CPU path's boxes: replayable (soft-label stores) and resumable
mid-epoch. The main process decodes the whole batch with ``torchvision.io.decode_jpeg(list,
device=...)`` (batched nvJPEG on CUDA, on a stream of its own: see ``GpuDecoder``; per image with
libjpeg-turbo on the CPU, which is how the tests run it) and crops, resizes (antialiased bilinear,
as the CPU path), flips and normalises on the device, batched (``wsld.data.resize``); in training
the prefetcher (``wsld.data.prefetch``) does all of it for the next batch while a step runs.

Files nvJPEG should not get (PNG, CMYK/YCCK or Adobe-RGB JPEGs, a JPEG without its end marker)
are decoded in the worker by the CPU transform itself, so they are bit-identical to the CPU path
and counted (``DecodeStats.cpu_worker``). A JPEG the device refuses is retried alone, then decoded
on the CPU in the main process (``cpu_main``); one nothing can decode is a ``CorruptSample``.

What differs from the CPU path (measured in tests/test_gpu_decode.py and BENCHMARKS.md): the
resize runs in float32 and is rounded once, where the CPU path resizes uint8 in fixed point (at
most 1 grey level apart, about 0.1 on average); ``data.fast_decode``'s DCT-domain downscaling is
not used (the device always decodes at full size); nvJPEG's IDCT and chroma upsampling are not
libjpeg-turbo's (a few grey levels, not measurable without a GPU). ``color_jitter`` and
``train_crop=padded`` are CPU-only.
"""

from __future__ import annotations

import copy
import io
from dataclasses import dataclass
from typing import Any, Optional, Union

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from wsld.data.batch import Batch
from wsld.data.datasets import CorruptSample, PhotoDataset
from wsld.data.images import EncodedImage, ImageDecodeError
from wsld.data.resize import GROUP, crop_resize
from wsld.data.sampling import split_key
from wsld.data.streams import CudaStreams, Streams
from wsld.data.transforms import TrainTransform, ValTransform
from wsld.errors import DataError, UserError

try:
    import simplejpeg
except ImportError:  # pragma: no cover - Pillow reads the header instead
    simplejpeg = None

DECODE_MODES = ("cpu", "gpu", "auto")
_SOI, _EOI = b"\xff\xd8", b"\xff\xd9"
_DEVICE_COLORSPACES = ("YCbCr", "Gray")  # what nvJPEG turns into RGB like libjpeg-turbo does
_PLAN = 9  # top, left, h, w, resize_h, resize_w, flip, image height, image width
_HEADER = _PLAN + 1  # int32 fields of a packed sample: the plan, then the length of the path


def device_decodable(data: bytes) -> bool:
    """A complete YCbCr or grayscale JPEG: the device decodes it; anything else goes to the CPU path."""
    if data[:2] != _SOI or data[-2:] != _EOI:  # not a JPEG, or truncated (the CPU path reports it)
        return False
    if simplejpeg is not None:
        try:
            return simplejpeg.decode_jpeg_header(data)[2] in _DEVICE_COLORSPACES
        except ValueError:
            return False
    from PIL import Image

    try:
        img = Image.open(io.BytesIO(data))
    except Exception:  # noqa: BLE001 - the CPU path explains what is wrong with it
        return False
    return img.format == "JPEG" and img.mode in ("RGB", "L")


class PlanTransform:
    """Wraps a photo transform: a device-decodable JPEG becomes ``(plan, bytes)``, anything else its pixels.

    The plan is ``(top, left, h, w, resize_h, resize_w, flip, height, width)``: crop the box of the
    ``height`` x ``width`` image, resize it, centre-crop to ``size``, flip. Train: the crop ``TrainTransform`` would take, resized to ``size``; val: the
    whole image, resized on its shorter side to ``val_resize``.
    """

    def __init__(self, inner: Union[TrainTransform, ValTransform]):
        if isinstance(inner, TrainTransform) and (inner.crop != "resized" or inner.jitter is not None):
            raise UserError("data.decode=gpu supports train_crop=resized without color_jitter: use data.decode=cpu")
        if not isinstance(inner, (TrainTransform, ValTransform)):
            raise UserError(f"data.decode=gpu needs a photo dataset's transform, got {type(inner).__name__}")
        self.inner = inner
        self.size = inner.size

    def __call__(self, img: EncodedImage, seed: Optional[int] = None) -> Union[Tensor, tuple[tuple[int, ...], bytes]]:
        if not device_decodable(img.data):
            return self.inner(img, seed)  # uint8 (3, size, size), exactly the CPU path's
        if isinstance(self.inner, TrainTransform):
            top, left, h, w, flip = self.inner.crop_box(img.width, img.height, seed)
            return (top, left, h, w, self.size, self.size, int(flip), img.height, img.width), img.data
        rh, rw = self.inner.resized_shape(img.width, img.height)
        return (0, 0, img.height, img.width, rh, rw, 0, img.height, img.width), img.data


class EncodedPhotoDataset(PhotoDataset):
    """A photo dataset whose items are ``(packed uint8 tensor, label)`` for device decoding.

    A 1-D item is a packed sample: 10 int32 (the plan, then the length of the path) + the path in
    UTF-8 (for messages) + the JPEG bytes. A 3-D item is the CPU path's pixels (PNG, CMYK...).
    Both are tensors, so wrappers that expect ``(tensor, label)`` (long-tail subsets, the
    soft-label replay) pass them through; errors and ``CorruptSample`` are ``PhotoDataset``'s.
    """

    def __init__(self, dataset: PhotoDataset):
        super().__init__(dataset.source, PlanTransform(dataset.transform), dataset.on_corrupt)

    def __getitem__(self, key):
        item = super().__getitem__(key)
        if isinstance(item, CorruptSample) or isinstance(item[0], Tensor):
            return item
        (plan, data), label = item
        path = self.describe(split_key(key)[0]).encode("utf-8", "replace")
        head = torch.tensor([*plan, len(path)], dtype=torch.int32).view(torch.uint8)
        return torch.cat([head, torch.frombuffer(bytearray(path + data), dtype=torch.uint8)]), label


def encoded_view(dataset: Dataset) -> Dataset:
    """The same samples as ``dataset`` (a photo dataset or a long-tail subset of one) for device decoding."""
    from wsld.data.build import SubsetWithTargets

    if isinstance(dataset, SubsetWithTargets):
        view = copy.copy(dataset)
        view.dataset = encoded_view(dataset.dataset)
        return view
    if not isinstance(dataset, PhotoDataset):
        raise UserError("data.decode=gpu needs photo data (data.format folder, list or lmdb), not built-in arrays")
    return EncodedPhotoDataset(dataset)


def resolve_decode(mode: str, device: torch.device, dataset: Dataset, probe: int = 16) -> str:
    """``cpu`` or ``gpu`` for ``data.decode``; ``auto`` is gpu on CUDA when ``probe`` train samples spread
    over the split are device-decodable JPEGs and the augmentation can run on the device."""
    if mode not in DECODE_MODES:
        raise UserError(f"config key 'data.decode': '{mode}' is not one of {', '.join(DECODE_MODES)}")
    if mode != "auto":
        if mode == "gpu":
            encoded_view(dataset)  # refuses data or transforms the device path cannot take
        return mode
    if device.type != "cuda":
        return "cpu"
    try:
        view = encoded_view(dataset)
    except UserError:
        return "cpu"
    base = view.dataset if hasattr(view, "indices") else view
    n = len(base.source)
    picks = sorted({int(i) for i in np.linspace(0, n - 1, num=min(probe, n))}) if n else []
    try:
        return "gpu" if picks and all(device_decodable(base.source.read(i)) for i in picks) else "cpu"
    except Exception:  # noqa: BLE001 - an unreadable probe: let the CPU path report it in training
        return "cpu"


@dataclass
class EncodedBatch:
    """What the workers hand the main process: the JPEGs' bytes and plans, and the rows decoded on the CPU."""

    data: Tensor  # uint8, the device rows' JPEG bytes concatenated
    offsets: list[int]  # row k's bytes are data[offsets[k]:offsets[k + 1]]
    plans: Tensor  # int64 (n_device, 9): see PlanTransform
    device_rows: Tensor  # int64: rows of the batch that data/plans describe, in order
    paths: list[str]  # per device row, for messages
    pixels: Tensor  # uint8 (n_cpu, 3, S, S): rows decoded by the CPU path in the workers
    pixel_rows: Tensor  # int64: their rows


def collate_encoded(samples: list) -> Batch:
    """Train/val collate for ``EncodedPhotoDataset`` items ``(tensor, label)`` or, replaying a
    soft-label store, ``(tensor, label, record)``; corrupt markers are set aside. Runs in the workers."""
    good = [s for s in samples if not isinstance(s, CorruptSample)]
    bad = [s for s in samples if isinstance(s, CorruptSample)]
    targets = torch.tensor([int(s[1]) for s in good], dtype=torch.int64)
    chunks, offsets, plans, rows, paths, pixels, pixel_rows = [], [0], [], [], [], [], []
    for r, s in enumerate(good):
        t = s[0]
        if t.dim() == 3:
            pixels.append(t)
            pixel_rows.append(r)
            continue
        head = t[: 4 * _HEADER].view(torch.int32).tolist()
        start = 4 * _HEADER + head[_PLAN]
        paths.append(bytes(t[4 * _HEADER : start].numpy()).decode("utf-8"))
        plans.append(head[:_PLAN])
        chunks.append(t[start:])
        offsets.append(offsets[-1] + len(t) - start)
        rows.append(r)
    encoded = EncodedBatch(
        data=torch.cat(chunks) if chunks else torch.empty(0, dtype=torch.uint8), offsets=offsets,
        plans=torch.tensor(plans, dtype=torch.int64).view(-1, _PLAN), device_rows=torch.tensor(rows, dtype=torch.int64),
        paths=paths, pixels=torch.stack(pixels) if pixels else torch.empty((0, 3, 0, 0), dtype=torch.uint8),
        pixel_rows=torch.tensor(pixel_rows, dtype=torch.int64),
    )  # fmt: skip
    records = None
    if good and len(good[0]) == 3:
        from wsld.soft_labels.store import records_to_tensors

        records = records_to_tensors(np.concatenate([s[2] for s in good]))
    return Batch(None, targets, bad, teacher_records=records, encoded=encoded)


@dataclass
class DecodeStats:
    """Images decoded per place since the decoder was made (for the run summary)."""

    device: int = 0  # decoded on the device
    cpu_worker: int = 0  # not for the device (PNG, CMYK...): the CPU path in the loader workers
    cpu_main: int = 0  # refused by the device, decoded on the CPU in the main process
    corrupt: int = 0  # no decoder could read it (dropped from the batch)

    def as_dict(self) -> dict[str, Any]:
        return {"device": self.device, "cpu_worker": self.cpu_worker, "cpu_main": self.cpu_main, "corrupt": self.corrupt}


class GpuDecoder:
    """Decodes an ``EncodedBatch`` on ``device`` into normalised float images (NCHW, channels_last if asked).

    ``decoder(batch)`` returns a new ``Batch``: ``images`` = ``(x - mean*255) / (std*255)`` as
    ``BatchNormalizer`` gives for the CPU path's uint8 images, ``targets`` and ``teacher_records``
    without the rows no decoder could read (those join ``corrupt``, or raise with
    ``on_corrupt="stop"``).

    Memory safety on CUDA (docs/data.md): nvJPEG's hardware decoder may write its output before the
    work already queued on its stream has run, so it never gets a stream with other work, nor memory
    that work may still read: it decodes on a stream of its own (``decode_stream``), whose memory
    pool nothing else allocates from; the caller's current stream waits for it and each decoded
    image is kept from reuse until the caller's work on it is done (``record_stream``). Everything
    after the decode (one ``resize.crop_resize`` per group of same-size images, rounding, flip,
    normalisation) runs on the caller's current stream: the training stream, or the prefetcher's
    side stream (``wsld.data.prefetch``). ``streams`` replaces ``CudaStreams`` (tests watch it).
    """

    collate = staticmethod(collate_encoded)

    def __init__(self, mean: list[float], std: list[float], image_size: int, device: Union[str, torch.device],
                 channels_last: bool = False, on_corrupt: str = "skip", streams: Optional[Streams] = None):  # fmt: skip
        self.device = torch.device(device)
        self.mean = torch.tensor(mean, device=self.device).view(1, -1, 1, 1) * 255.0
        self.inv_std = 1.0 / (torch.tensor(std, device=self.device).view(1, -1, 1, 1) * 255.0)
        self.size = int(image_size)
        self.channels_last = channels_last
        self.on_corrupt = on_corrupt
        self.stats = DecodeStats()
        self.streams = streams if streams is not None else (CudaStreams(self.device) if self.device.type == "cuda" else None)
        self.decode_stream = self.streams.new() if self.streams is not None else None

    def __call__(self, batch: Batch) -> Batch:
        enc = batch.encoded
        if not isinstance(enc, EncodedBatch):
            raise TypeError("GpuDecoder needs batches from collate_encoded (an EncodedPhotoDataset's loader)")
        n, s, dev = len(batch), self.size, self.device
        out = torch.zeros((n, 3, s, s), dtype=torch.float32, device=dev)
        keep = torch.ones(n, dtype=torch.bool)
        corrupt = list(batch.corrupt)
        if len(enc.pixel_rows):
            out[enc.pixel_rows.to(dev, non_blocking=True)] = enc.pixels.to(dev, non_blocking=True).float()
            self.stats.cpu_worker += len(enc.pixel_rows)
        plans = enc.plans.numpy()
        groups: dict[tuple[int, int], list[tuple[int, Tensor]]] = {}  # decoded size -> (device row, image)
        for k, img in enumerate(self._decode(enc, [(int(p[7]), int(p[8])) for p in plans])):
            if isinstance(img, str):
                keep[int(enc.device_rows[k])] = False
                corrupt.append(CorruptSample(enc.paths[k], img))
            else:
                groups.setdefault(tuple(img.shape[-2:]), []).append((k, img))
        for members in groups.values():
            for at in range(0, len(members), GROUP):
                part = members[at : at + GROUP]
                ks = [k for k, _ in part]
                rows = enc.device_rows[ks].to(dev, non_blocking=True)
                out.index_copy_(0, rows, crop_resize([img for _, img in part], plans[ks], s))
        out.round_()  # the CPU path's images are uint8: same grey levels here
        x = (out - self.mean) * self.inv_std
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        records = batch.teacher_records
        if not bool(keep.all()):  # a CPU tensor: no device sync
            idx = keep.nonzero().flatten()
            x = x.index_select(0, idx.to(dev, non_blocking=True))
            if records is not None:
                records = {k: v[keep] for k, v in records.items()}
        return Batch(x, batch.targets[keep], corrupt, teacher_records=records)

    prepare = __call__  # the engine's name for "normalised images on the device" (BatchNormalizer.prepare)

    def _decode(self, enc: EncodedBatch, sizes: list[tuple[int, int]]) -> list[Union[Tensor, str]]:
        """Each device row's RGB uint8 (3, H, W) on the device, or why it could not be decoded. An
        image the device refuses, or decodes to another size than its header's, goes to the CPU."""
        jpegs = [enc.data[a:b] for a, b in zip(enc.offsets[:-1], enc.offsets[1:])]
        if not jpegs:
            return []
        if self.streams is None:
            imgs = self._decode_jpegs(jpegs)
        else:
            with self.streams.use(self.decode_stream):  # a stream that holds nothing but decoding
                imgs = self._decode_jpegs(jpegs)
            current = self.streams.current()
            self.streams.wait(current, self.decode_stream)
            for img in imgs:
                if img is not None:
                    self.streams.keep_for(img, current)
        out: list[Union[Tensor, str]] = []
        for k, img in enumerate(imgs):
            if img is not None and tuple(img.shape[-2:]) == sizes[k]:
                self.stats.device += 1
                out.append(img)
            else:
                out.append(self._decode_on_cpu(jpegs[k], enc.paths[k]))
        return out

    def _decode_jpegs(self, jpegs: list[Tensor]) -> list[Optional[Tensor]]:
        """torchvision's batched decode on the current stream; one by one when one image fails it."""
        from torchvision.io import ImageReadMode, decode_jpeg

        try:
            return list(decode_jpeg(jpegs, mode=ImageReadMode.RGB, device=self.device))
        except RuntimeError:  # one bad image fails the whole batch: decode them one by one
            imgs: list[Optional[Tensor]] = []
            for data in jpegs:
                try:
                    imgs.append(decode_jpeg(data, mode=ImageReadMode.RGB, device=self.device))
                except RuntimeError:
                    imgs.append(None)
            return imgs

    def _decode_on_cpu(self, data: Tensor, path: str) -> Union[Tensor, str]:
        """The CPU path's strict decoder (libjpeg-turbo, then Pillow); the reason when it fails too."""
        try:
            arr, _ = EncodedImage(bytes(data.numpy())).decode()
        except (ImageDecodeError, OSError, ValueError, SyntaxError, EOFError) as e:
            if self.on_corrupt == "stop":
                raise DataError(f"corrupt image {path}: {e} (data.on_corrupt=skip skips it)") from None
            self.stats.corrupt += 1
            return str(e)
        self.stats.cpu_main += 1
        return torch.from_numpy(arr).permute(2, 0, 1).to(self.device, non_blocking=True)
