"""ImageNet train/val transforms from an opened image to a uint8 CHW tensor, with fast decoding.

Where the time goes for a typical 500x375 JPEG and a 224 crop (one core): the decode, then the
resize. So:

- JPEGs are decoded by libjpeg-turbo straight into a numpy array (``simplejpeg``; the same pixels
  as Pillow, about 35% faster), other formats by Pillow (``images.EncodedImage``).
- The crop is chosen from the header alone (the image size), before any pixel is decoded, and a
  JPEG is then decoded directly at a reduced scale when the crop allows it (libjpeg's DCT-domain
  1/2, 1/4, 1/8 scaling), never below the size the crop is resized to, so the resize still only
  shrinks. (For 500x375 photos and 224 crops that is rare; it pays for large photos and small
  crops.)
- The decoded pixels become a uint8 tensor without conversion (HWC memory seen as CHW), the crop
  is a view, and the resize is torch's antialiased bilinear resize on uint8 channels-last data
  (vectorised; about 3x faster than Pillow's here, and matching it to a fraction of a grey level).
- Random parameters come from a private ``torch.Generator`` seeded with the sample seed. It
  draws the same numbers as ``torch.manual_seed(seed)`` followed by torchvision's
  ``RandomResizedCrop`` + ``RandomHorizontalFlip`` (+ ``ColorJitter``), so the crop is the one
  torchvision would pick under ``sampling.seeded_rng(seed)``, without re-seeding torch's global
  RNG for every sample (0.2-0.4 ms each). Without a seed, one is drawn from the global RNG.

No normalisation here: the engine normalises on the device, so loaders move uint8.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from wsld.data.images import EncodedImage

_RATIO = (3.0 / 4.0, 4.0 / 3.0)


def decoded_chw(img: EncodedImage, min_width: int = 0, min_height: int = 0) -> tuple[Tensor, float]:
    """Decode into a uint8 (3, H, W) tensor viewing HWC memory, and the decoded/original scale."""
    arr, scale = img.decode(min_width, min_height)
    return torch.from_numpy(arr).permute(2, 0, 1), scale


def resize_uint8(t: Tensor, size: tuple[int, int]) -> Tensor:
    """Antialiased bilinear resize of a uint8 (3, H, W) tensor to ``size`` = (h, w)."""
    if tuple(t.shape[-2:]) == tuple(size):
        return t
    return torch.nn.functional.interpolate(t.unsqueeze(0), size=size, mode="bilinear", align_corners=False,
                                           antialias=True).squeeze(0)


def _generator(seed: Optional[int]) -> torch.Generator:
    if seed is None:
        seed = int(torch.randint(0, 2**62, (1,)).item())
    return torch.Generator().manual_seed(int(seed))


def random_resized_crop_params(width: int, height: int, scale: tuple[float, float], g: torch.Generator,
                               ratio: tuple[float, float] = _RATIO) -> tuple[int, int, int, int]:
    """torchvision's ``RandomResizedCrop.get_params`` drawing from ``g``: (top, left, h, w)."""
    area = height * width
    log_ratio = torch.log(torch.tensor(ratio))
    for _ in range(10):
        target_area = area * torch.empty(1).uniform_(scale[0], scale[1], generator=g).item()
        aspect = torch.exp(torch.empty(1).uniform_(log_ratio[0].item(), log_ratio[1].item(), generator=g)).item()
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, size=(1,), generator=g).item())
            left = int(torch.randint(0, width - w + 1, size=(1,), generator=g).item())
            return top, left, h, w
    in_ratio = width / height  # fallback: the central crop
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


class _ColorJitter:
    """ColorJitter(c, c, c) on uint8 tensors with torchvision's parameter order, drawing from ``g``."""

    def __init__(self, strength: float):
        self.range = (max(0.0, 1 - strength), 1 + strength)

    def __call__(self, t: Tensor, g: torch.Generator) -> Tensor:
        from torchvision.transforms.v2 import functional as F

        order = torch.randperm(4, generator=g).tolist()
        b, c, s = (float(torch.empty(1).uniform_(*self.range, generator=g)) for _ in range(3))
        for i in order:
            if i == 0:
                t = F.adjust_brightness(t, b)
            elif i == 1:
                t = F.adjust_contrast(t, c)
            elif i == 2:
                t = F.adjust_saturation(t, s)
        return t


class PadCropFlip:
    """Random crop of a zero-padded image (+ horizontal flip), drawn from a per-sample generator.

    The same as torchvision's RandomCrop(size, padding) + RandomHorizontalFlip, but reading its
    random numbers from ``g`` (seeded per sample), so there is no global-RNG re-seeding per sample.
    """

    def __init__(self, pad: int, flip: bool):
        self.pad, self.flip = pad, flip

    def params(self, g: torch.Generator) -> tuple[int, int, bool]:
        top = int(torch.randint(0, 2 * self.pad + 1, (1,), generator=g))
        left = int(torch.randint(0, 2 * self.pad + 1, (1,), generator=g))
        flip = self.flip and bool(torch.rand(1, generator=g) < 0.5)
        return top, left, flip

    def __call__(self, img: Tensor, g: torch.Generator) -> Tensor:
        top, left, flip = self.params(g)
        h, w = img.shape[-2:]
        out = torch.nn.functional.pad(img, (self.pad,) * 4)[..., top : top + h, left : left + w]
        return out.flip(-1) if flip else out.contiguous()


class TrainTransform:
    """RandomResizedCrop(size, scale=(min_scale, 1)) + horizontal flip (+ ColorJitter(c, c, c)).

    ``crop="padded"`` instead takes the validation view (Resize + CenterCrop to ``size``) and a
    random ``size`` crop of it zero-padded by ``padding`` pixels (torchvision's RandomCrop(size,
    padding), random numbers drawn top, left, then flip): the usual augmentation for small images
    (CIFAR, Fashion-MNIST), where RandomResizedCrop would mostly blur them.
    """

    def __init__(self, image_size: int, min_scale: float = 0.08, hflip: bool = True, color_jitter: float = 0.0,
                 fast_decode: bool = True, crop: str = "resized", padding: int = 4):
        if crop not in ("resized", "padded"):
            raise ValueError(f"crop must be 'resized' or 'padded', got {crop!r}")
        self.size = int(image_size)
        self.scale = (float(min_scale), 1.0)
        self.hflip = hflip
        self.fast_decode = fast_decode
        self.jitter = _ColorJitter(color_jitter) if color_jitter > 0 else None
        self.crop = crop
        self.padding = int(padding)
        self._view = ValTransform(self.size, self.size, fast_decode) if crop == "padded" else None
        self.pad_crop = PadCropFlip(self.padding, hflip)

    def crop_box(self, width: int, height: int, seed: Optional[int]) -> tuple[int, int, int, int, bool]:
        """``(top, left, h, w, flip)`` of the ``resized`` crop this transform takes of a ``width`` x ``height``
        image under ``seed``, without decoding it (the GPU decode path crops on the device)."""
        return self._draw_box(width, height, _generator(seed))

    def _draw_box(self, width: int, height: int, g: torch.Generator) -> tuple[int, int, int, int, bool]:
        top, left, h, w = random_resized_crop_params(width, height, self.scale, g)
        flip = self.hflip and torch.rand(1, generator=g).item() < 0.5  # drawn before any jitter, as torchvision
        return top, left, h, w, bool(flip)

    def __call__(self, img: EncodedImage, seed: Optional[int] = None) -> Tensor:
        """``img``'s header is read, its pixels not yet decoded; returns uint8 (3, size, size)."""
        g = _generator(seed)
        if self.crop == "padded":
            out = self.pad_crop(self._view(img), g)  # type: ignore[misc]
            if self.jitter is not None:
                out = self.jitter(out, g)
            return out.contiguous()
        top, left, h, w, flip = self._draw_box(img.width, img.height, g)
        need_w = need_h = 0
        if self.fast_decode:  # decoded size such that the crop keeps >= `size` pixels on both sides
            need_w, need_h = math.ceil(img.width * self.size / w), math.ceil(img.height * self.size / h)
        t, s = decoded_chw(img, need_w, need_h)
        if s != 1.0:  # crop box in decoded pixels, clamped to the (rounded-up) decoded size
            x0, y0 = min(round(left * s), t.shape[2] - 1), min(round(top * s), t.shape[1] - 1)
            x1 = max(x0 + 1, min(t.shape[2], round((left + w) * s)))
            y1 = max(y0 + 1, min(t.shape[1], round((top + h) * s)))
        else:
            x0, y0, x1, y1 = left, top, left + w, top + h
        out = resize_uint8(t[:, y0:y1, x0:x1], (self.size, self.size))
        if flip:
            out = out.flip(-1)
        if self.jitter is not None:
            out = self.jitter(out, g)
        return out.contiguous()


class ValTransform:
    """Resize(resize) on the shorter side + CenterCrop(size), as torchvision's ImageNet evaluation."""

    def __init__(self, image_size: int, resize: int = 256, fast_decode: bool = True):
        self.size = int(image_size)
        self.resize = int(resize)
        self.fast_decode = fast_decode

    def resized_shape(self, width: int, height: int) -> tuple[int, int]:
        """``(h, w)`` of a ``width`` x ``height`` image after Resize(resize) on its shorter side."""
        short, long = (width, height) if width <= height else (height, width)
        new_long = int(self.resize * long / short)  # torchvision's rounding for Resize(int)
        return (new_long, self.resize) if width <= height else (self.resize, new_long)

    def __call__(self, img: EncodedImage, seed: Optional[int] = None) -> Tensor:
        new_h, new_w = self.resized_shape(img.width, img.height)
        t, _ = decoded_chw(img, new_w, new_h) if self.fast_decode else decoded_chw(img)
        t = resize_uint8(t, (new_h, new_w))
        if (new_w, new_h) != (self.size, self.size):
            from torchvision.transforms.v2 import functional as F

            t = F.center_crop(t, [self.size, self.size])
        return t.contiguous()
