"""Whether a model takes the data's images: one forward of two blank images at build time, so an
image size a model cannot shrink through (pooling down to nothing) is one line, not a traceback
in the first training step."""

from __future__ import annotations

import torch
from torch import nn

from wsld.errors import UserError


def check_takes_images(model: nn.Module, name: str, in_channels: int, size: int, num_classes: int) -> None:
    """Run ``model`` (in eval mode, no grad, on zeros: no RNG drawn, no statistic updated) on a
    ``(2, in_channels, size, size)`` batch; a failure or an output other than ``(2, num_classes)``
    logits is a UserError naming the model and the size."""
    x = torch.zeros(2, in_channels, size, size, device=next((p.device for p in model.parameters()), None))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(x)
    except (RuntimeError, ValueError, IndexError) as e:
        text = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise UserError(f"model '{name}' cannot take {in_channels} x {size} x {size} images ({text}): use a larger "
                        "data.image_size, or a model made for images this small") from None
    finally:
        model.train(was_training)
    shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
    if shape != (2, num_classes):
        raise UserError(f"model '{name}' returns {shape} for a batch of 2 images, not logits of shape (2, {num_classes})")
