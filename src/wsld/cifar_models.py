"""The CIFAR benchmark's networks, by name: CIFAR ResNets (x4 widths too), wide ResNets and VGG with BatchNorm.

These are the architectures of the CRD benchmark (Tian et al., ICLR 2020, whose RepDistiller code
the KD papers on CIFAR-100 share), written here from the papers and checked against CRD's
parameter counts (tests/test_models_crd.py). CRD's names map to ours as:

  resnet20, resnet32, resnet56, resnet110   -> cifar_resnet20, cifar_resnet32, cifar_resnet56, cifar_resnet110
  resnet8x4, resnet32x4                      -> cifar_resnet8x4, cifar_resnet32x4
  wrn_40_2, wrn_16_2 (wrn_<depth>_<k>)        -> cifar_wrn_40_2, cifar_wrn_16_2 (cifar_wrn_<6n+4>_<k>)
  vgg8, vgg11, vgg13, vgg16, vgg19 (the _bn)  -> cifar_vgg8, cifar_vgg11, cifar_vgg13, cifar_vgg16, cifar_vgg19
"""

from __future__ import annotations

import re
from typing import Callable, Optional

import torch
from torch import nn

from wsld.errors import UserError


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers and a shortcut; where the shape changes the shortcut is a strided 1x1
    conv + BN (CRD's models, so resnet8x4's 32 -> 64 stem-to-stage step has one too)."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


def _he_init(model: nn.Module) -> None:
    """He et al. 2015 normal init of every conv (fan_out), zero biases: what the CIFAR papers' nets use."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)


class CifarResNet(nn.Module):
    """CIFAR ResNet (He et al. 2016, section 4.2): 3x3 stem, three stages of ``(depth - 2) / 6``
    BasicBlocks at widths 16k/32k/64k (strides 1, 2, 2), global average pool, linear head.

    The stem is ``max(16, 8k)`` wide: 16 for the paper's nets, 32 for CRD's ``resnet8x4`` /
    ``resnet32x4`` (k = 4: stages 64/128/256), whose parameter counts this reproduces.
    ``stem_stride=2`` quarters the cost on small inputs (28x28 -> 14x14 before the first stage).
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 3, depth: int = 20, width: int = 1, stem_stride: int = 1):
        super().__init__()
        if depth < 8 or (depth - 2) % 6 or width < 1:
            raise ValueError(f"CIFAR ResNet needs depth 6n+2 >= 8 and width >= 1, got depth {depth}, width {width}")
        n, stem = (depth - 2) // 6, max(16, 8 * width)
        layers: list[nn.Module] = [
            nn.Conv2d(in_channels, stem, 3, stem_stride, 1, bias=False), nn.BatchNorm2d(stem), nn.ReLU(inplace=True)
        ]
        cin = stem
        for cout, stride in ((16 * width, 1), (32 * width, 2), (64 * width, 2)):
            for i in range(n):
                layers.append(BasicBlock(cin, cout, stride if i == 0 else 1))
                cin = cout
        self.features = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(cin, num_classes)
        _he_init(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))


class WideBlock(nn.Module):
    """Pre-activation block (Zagoruyko & Komodakis 2016): BN-ReLU-conv3x3-BN-ReLU-conv3x3 added to
    the input; where the shape changes, to a strided 1x1 conv (no BN) of the pre-activated input."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.shortcut: Optional[nn.Conv2d] = None
        if stride != 1 or cin != cout:
            self.shortcut = nn.Conv2d(cin, cout, 1, stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = torch.relu(self.bn1(x))
        out = self.conv2(torch.relu(self.bn2(self.conv1(pre))))
        return out + (x if self.shortcut is None else self.shortcut(pre))


class WideResNet(nn.Module):
    """WRN-depth-k for 32x32 images: a 16-wide 3x3 stem, three stages of ``(depth - 4) / 6`` wide
    blocks at widths 16k/32k/64k (strides 1, 2, 2), BN + ReLU, global average pool, linear head
    (no dropout, as CRD trains them)."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3, depth: int = 16, widen: int = 1):
        super().__init__()
        if depth < 10 or (depth - 4) % 6 or widen < 1:
            raise ValueError(f"wide ResNet needs depth 6n+4 >= 10 and width >= 1, got depth {depth}, width {widen}")
        n = (depth - 4) // 6
        layers: list[nn.Module] = [nn.Conv2d(in_channels, 16, 3, 1, 1, bias=False)]
        cin = 16
        for cout, stride in ((16 * widen, 1), (32 * widen, 2), (64 * widen, 2)):
            for i in range(n):
                layers.append(WideBlock(cin, cout, stride if i == 0 else 1))
                cin = cout
        layers += [nn.BatchNorm2d(cin), nn.ReLU(inplace=True), nn.AdaptiveAvgPool2d(1), nn.Flatten()]
        self.features = nn.Sequential(*layers)
        self.fc = nn.Linear(cin, num_classes)
        _he_init(self)
        nn.init.zeros_(self.fc.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))


# conv widths of VGG's five stages (Simonyan & Zisserman 2015, configurations A, B, D, E; "8" is CRD's one-conv-per-stage net)
VGG_STAGES: dict[int, list[list[int]]] = {
    8: [[64], [128], [256], [512], [512]],
    11: [[64], [128], [256, 256], [512, 512], [512, 512]],
    13: [[64, 64], [128, 128], [256, 256], [512, 512], [512, 512]],
    16: [[64, 64], [128, 128], [256, 256, 256], [512, 512, 512], [512, 512, 512]],
    19: [[64, 64], [128, 128], [256, 256, 256, 256], [512, 512, 512, 512], [512, 512, 512, 512]],
}


class CifarVGG(nn.Module):
    """VGG with BatchNorm for 32x32 images, as CRD's ``vgg<d>`` (its ``vgg<d>_bn``): five stages of
    3x3 conv (with bias) + BN + ReLU, a 2x2 max pool after each of the first three (32 -> 4 pixels;
    the last two stages run at 4x4), global average pool, one linear layer (no fully connected stack)."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3, depth: int = 13):
        super().__init__()
        if depth not in VGG_STAGES:
            raise ValueError(f"VGG depth must be one of {sorted(VGG_STAGES)}, got {depth}")
        layers: list[nn.Module] = []
        cin = in_channels
        for stage, widths in enumerate(VGG_STAGES[depth]):
            for w in widths:
                layers += [nn.Conv2d(cin, w, 3, 1, 1), nn.BatchNorm2d(w), nn.ReLU(inplace=True)]
                cin = w
            if stage < 3:
                layers.append(nn.MaxPool2d(2))
        self.features = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(cin, num_classes)
        _he_init(self)
        nn.init.normal_(self.fc.weight, 0.0, 0.01)
        nn.init.zeros_(self.fc.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))


CIFAR_RESNET_PATTERN = re.compile(r"cifar_resnet(\d+)(?:x(\d+))?(_s2)?")
CIFAR_WRN_PATTERN = re.compile(r"cifar_wrn_(\d+)_(\d+)")
CIFAR_VGG_PATTERN = re.compile(r"cifar_vgg(\d+)")
CIFAR_MODEL_NAMES = (
    "cifar_resnet<depth 6n+2>[x<k>][_s2] (cifar_resnet8/14/20/32/44/56/110, cifar_resnet8x4, cifar_resnet32x4), "
    "cifar_wrn_<depth 6n+4>_<k> (cifar_wrn_16_2, cifar_wrn_40_2), cifar_vgg8/11/13/16/19"
)


def _resnet(name: str, key: str, m: re.Match) -> tuple[Callable[..., nn.Module], dict]:
    depth, width = int(m[1]), int(m[2] or 1)
    if depth < 8 or (depth - 2) % 6:
        near = max(8, (depth - 2) // 6 * 6 + 2)
        raise UserError(
            f"config key '{key}': '{name}' has depth {depth}, a CIFAR ResNet's depth is 6n+2 "
            f"(8, 14, 20, 32, 44, 56, 110, ...): e.g. cifar_resnet{near}"
        )
    if width < 1:
        raise UserError(f"config key '{key}': '{name}' has width x{width}; give x1 or more (cifar_resnet8x4)")
    return CifarResNet, {"depth": depth, "width": width, "stem_stride": 2 if m[3] else 1}


def _wrn(name: str, key: str, m: re.Match) -> tuple[Callable[..., nn.Module], dict]:
    depth, widen = int(m[1]), int(m[2])
    if depth < 10 or (depth - 4) % 6:
        raise UserError(
            f"config key '{key}': '{name}' has depth {depth}, a wide ResNet's depth is 6n+4 (10, 16, 22, 28, 40, ...): "
            f"e.g. cifar_wrn_{max(10, (depth - 4) // 6 * 6 + 4)}_{widen}"
        )
    if widen < 1:
        raise UserError(f"config key '{key}': '{name}' has width {widen}; give 1 or more (cifar_wrn_16_2)")
    return WideResNet, {"depth": depth, "widen": widen}


def _vgg(name: str, key: str, m: re.Match) -> tuple[Callable[..., nn.Module], dict]:
    depth = int(m[1])
    if depth not in VGG_STAGES:
        raise UserError(f"config key '{key}': '{name}': a VGG's depth is one of {', '.join(map(str, VGG_STAGES))} (e.g. cifar_vgg13)")
    return CifarVGG, {"depth": depth}


_FAMILIES = ((CIFAR_RESNET_PATTERN, _resnet), (CIFAR_WRN_PATTERN, _wrn), (CIFAR_VGG_PATTERN, _vgg))


def cifar_model(name: str, key: str) -> Optional[tuple[Callable[..., nn.Module], dict]]:
    """(class, arguments) of a ``cifar_...`` name, None for other names; UserError for a bad depth or width.

    Cheap (nothing is built), so a typo stops a run before any data is read.
    """
    for pattern, parse in _FAMILIES:
        m = pattern.fullmatch(name)
        if m is not None:
            return parse(name, key, m)
    return None


def crd_name_hint(name: str) -> Optional[str]:
    """Our name for one of CRD's (``resnet8x4`` -> ``cifar_resnet8x4``, ``wrn_40_2`` -> ``cifar_wrn_40_2``,
    ``vgg13`` / ``vgg13_bn`` -> ``cifar_vgg13``), None if it names none of our CIFAR models."""
    ours = "cifar_" + name.removesuffix("_bn")
    try:
        return ours if cifar_model(ours, "") is not None else None
    except UserError:
        return None
