"""Batched crop + antialiased resize + centre crop + flip of decoded images on the device, as two matrix products per group of same-size images.

Why: the device path used to crop and resize each image with its own ``F.interpolate`` call (256
launches and a Python loop per batch). An antialiased bilinear resize is separable: each output
row is a weighted sum of input rows, with the weights ``F.interpolate(..., antialias=True)``
uses (PIL's triangle filter, widened by the downscale factor, renormalised at the edges). The
crop box, the centre crop (including its zero padding) and the horizontal flip only choose which
weights go where, so one (size x H) and one (size x W) weight matrix per image do all of it, and
images of the same decoded size go through together: ``Wy @ X @ Wx^T``.

It matches the per-image path (``crop_resize_one``, kept as the reference) up to float32
summation order: values within ~1e-4 grey levels, so after rounding to whole grey levels a pixel
differs by 1 where the exact value sits at .5 (tests/test_gpu_decode.py measures it).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

GROUP = 64  # images per matrix product: bounds the float copy of a group (64 x 3 x 500 x 375 x 4 B = 144 MB)


def centre_offset(resized: np.ndarray, size: int) -> np.ndarray:
    """Index in the resized image of output pixel 0 of torchvision's CenterCrop (negative: zero padding)."""
    pad = (size - resized) // 2
    crop = np.array([int(round((r - size) / 2.0)) for r in resized.tolist()], dtype=np.int64)
    return np.where(resized < size, -pad, crop)


def axis_weights(start: Tensor, length: Tensor, resized: Tensor, offset: Tensor, flip: Tensor, size: int, in_size: int) -> Tensor:
    """(B, size, in_size) float32: output pixel i of image b along one axis as a weighted sum of its
    ``in_size`` input pixels: pixel ``i + offset`` (``size - 1 - i`` first when flipped) of the
    ``length`` pixels from ``start`` resized to ``resized``; zero rows outside the resized image."""
    dev = start.device
    f32 = torch.float32
    i = torch.arange(size, device=dev).view(1, -1, 1)
    i = torch.where(flip.view(-1, 1, 1), size - 1 - i, i)
    r = i + offset.view(-1, 1, 1)  # index in the resized image
    n_out, n_in = resized.view(-1, 1, 1), length.view(-1, 1, 1)
    scale = n_in.to(f32) / n_out.to(f32)  # as aten's area_pixel_compute_scale (align_corners=False)
    support = torch.where(scale >= 1.0, scale, torch.ones_like(scale))
    invscale = torch.where(scale >= 1.0, 1.0 / scale, torch.ones_like(scale))
    center = scale * (r.to(f32) + 0.5)
    lo = torch.clamp((center - support + 0.5).to(torch.int64), min=0)
    hi = torch.minimum((center + support + 0.5).to(torch.int64), n_in)
    p = torch.arange(in_size, device=dev).view(1, 1, -1) - start.view(-1, 1, 1)  # index in the crop
    w = (1.0 - ((p.to(f32) - center + 0.5) * invscale).abs()).clamp_min(0.0)
    w = torch.where((p >= lo) & (p < hi) & (p >= 0) & (p < n_in), w, torch.zeros_like(w))
    total = w.sum(-1, keepdim=True)
    w = torch.where(total > 0, w / torch.where(total > 0, total, torch.ones_like(total)), w)
    return torch.where((r >= 0) & (r < n_out), w, torch.zeros_like(w))


def crop_resize(images: Sequence[Tensor], plans: np.ndarray, size: int) -> Tensor:
    """Float (N, 3, size, size) for uint8 (3, H, W) ``images`` of one decoded size, with plans
    ``(top, left, h, w, resize_h, resize_w, flip, H, W)`` per row (``gpu_decode.PlanTransform``):
    crop, resize (antialiased bilinear), centre-crop to ``size``, flip. Not rounded."""
    dev = images[0].device
    H, W = images[0].shape[-2:]
    p = torch.from_numpy(np.concatenate([plans[:, :7], centre_offset(plans[:, 4], size)[:, None],
                                         centre_offset(plans[:, 5], size)[:, None]], axis=1))  # fmt: skip
    p = p.to(dev, non_blocking=True)
    no_flip = torch.zeros_like(p[:, 6], dtype=torch.bool)
    wy = axis_weights(p[:, 0], p[:, 2], p[:, 4], p[:, 7], no_flip, size, int(H))
    wx = axis_weights(p[:, 1], p[:, 3], p[:, 5], p[:, 8], p[:, 6] > 0, size, int(W))
    x = torch.stack(list(images)).float()  # (N, 3, H, W)
    x = torch.matmul(x, wx.transpose(1, 2).unsqueeze(1))  # horizontal first, as aten: (N, 3, H, size)
    return torch.matmul(wy.unsqueeze(1), x)  # (N, 3, size, size)


def crop_resize_one(img: Tensor, plan: Sequence[int], size: int) -> Tensor:
    """The per-image path (the reference ``crop_resize`` is measured against): float (3, size, size)."""
    top, left, h, w, rh, rw, flip = (int(v) for v in plan[:7])
    x = F.interpolate(img[:, top : top + h, left : left + w].unsqueeze(0).float(), size=(rh, rw),
                      mode="bilinear", align_corners=False, antialias=True)[0]  # fmt: skip
    if x.shape[-2:] != (size, size):
        from torchvision.transforms.v2 import functional as TF

        x = TF.center_crop(x, [size, size])
    return x.flip(-1) if flip else x
