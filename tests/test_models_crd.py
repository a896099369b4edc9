"""The CIFAR-100 benchmark's models (CRD's zoo under our names): they build, give 100 logits on
32x32 images, have CRD's parameter counts, and CRD's names point to ours."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from wsld.errors import UserError
from wsld.models import build_model, check_model_name

# our name -> (CRD's name, parameters in millions for 100 classes, as the KD papers on CIFAR-100
# tabulate them, rounded to two decimals)
CRD_MODELS = {
    "cifar_resnet20": ("resnet20", 0.28),
    "cifar_resnet32": ("resnet32", 0.47),
    "cifar_resnet56": ("resnet56", 0.86),
    "cifar_resnet110": ("resnet110", 1.74),
    "cifar_resnet8x4": ("resnet8x4", 1.23),
    "cifar_resnet32x4": ("resnet32x4", 7.43),
    "cifar_wrn_16_2": ("wrn_16_2", 0.70),
    "cifar_wrn_40_2": ("wrn_40_2", 2.26),
    "cifar_vgg8": ("vgg8", 3.97),  # 3,965,028: also seen truncated as 3.96M
    "cifar_vgg13": ("vgg13", 9.46),
}


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _meta_params(name: str, num_classes: int = 100) -> int:
    with torch.device("meta"):
        return _params(build_model(name, num_classes))


@pytest.mark.parametrize("name", sorted(CRD_MODELS))
def test_every_benchmark_model_builds_and_gives_100_logits(name):
    torch.manual_seed(0)
    model = build_model(name, 100).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 100) and torch.isfinite(out).all()
    assert check_model_name(name, "model.student") == "local"


@pytest.mark.parametrize("name", sorted(CRD_MODELS))
def test_parameter_counts_match_crd(name):
    assert round(_meta_params(name) / 1e6, 2) == CRD_MODELS[name][1]


def test_wrn_16_2_and_vgg8_parameter_counts_by_hand():
    def conv(cin: int, cout: int, k: int = 3, bias: bool = False) -> int:
        return cin * cout * k * k + (cout if bias else 0)

    def wide_block(cin: int, cout: int) -> int:  # BN(cin), conv, BN(cout), conv, 1x1 shortcut where the width changes
        return 2 * cin + conv(cin, cout) + 2 * cout + conv(cout, cout) + (conv(cin, cout, 1) if cin != cout else 0)

    stages = sum(wide_block(cin, cout) + wide_block(cout, cout) for cin, cout in ((16, 32), (32, 64), (64, 128)))
    wrn = conv(3, 16) + stages + 2 * 128 + 128 * 100 + 100
    assert _meta_params("cifar_wrn_16_2") == wrn == 703_284

    widths = [3, 64, 128, 256, 512, 512]  # one conv (with bias) + BN per stage
    vgg8 = sum(conv(a, b, bias=True) + 2 * b for a, b in zip(widths, widths[1:])) + 512 * 100 + 100
    assert _meta_params("cifar_vgg8") == vgg8 == 3_965_028


def test_architecture_details_crd_relies_on():
    x = torch.randn(2, 3, 32, 32)
    vgg = build_model("cifar_vgg13", 100)
    assert vgg.features[:-2](x).shape == (2, 512, 4, 4)  # pools after the first three stages only (32 -> 4)
    assert sum(isinstance(m, nn.BatchNorm2d) for m in vgg.modules()) == 10  # vgg13 = CRD's vgg13_bn
    wrn = build_model("cifar_wrn_40_2", 100)
    assert wrn.features[:-2](x).shape == (2, 128, 8, 8)  # widths 32/64/128 after a 16-wide stem
    shortcuts = [m.shortcut for m in wrn.modules() if hasattr(m, "shortcut") and m.shortcut is not None]
    assert len(shortcuts) == 3 and all(isinstance(s, nn.Conv2d) for s in shortcuts)  # 1x1 conv, no BN, once per stage
    r8x4 = build_model("cifar_resnet8x4", 100)
    assert r8x4.features[0].out_channels == 32 and r8x4.fc.in_features == 256  # CRD's [32, 64, 128, 256]


@pytest.mark.parametrize("crd, ours", [("wrn_40_2", "cifar_wrn_40_2"), ("vgg8", "cifar_vgg8"), ("resnet8x4", "cifar_resnet8x4")])
def test_crd_names_point_to_ours(crd, ours):
    with pytest.raises(UserError, match=f"did you mean {ours},"):
        check_model_name(crd, "model.teacher")


@pytest.mark.parametrize(
    "name, message",
    [("cifar_wrn_41_2", "6n\\+4"), ("cifar_wrn_16_0", "width 0"), ("cifar_vgg12", "one of 8, 11, 13, 16, 19")],
)
def test_bad_names_are_one_line_naming_the_key(name, message):
    with pytest.raises(UserError, match=message) as e:
        check_model_name(name, "model.student")
    assert "model.student" in str(e.value) and "\n" not in str(e.value)
