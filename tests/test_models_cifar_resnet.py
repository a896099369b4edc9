"""CIFAR ResNets (cifar_resnet<6n+2>[x<k>][_s2]): shapes, parameter counts, init, names, and a run through the CLI."""

from __future__ import annotations

import math

import pytest
import torch
from engine_helpers import REPO, TINY, records, run_cli
from torch import nn

from wsld.errors import UserError
from wsld.models import architecture_fingerprint, build_model, check_model_name


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _meta_params(name: str, num_classes: int, in_channels: int = 3) -> int:
    with torch.device("meta"):  # counts without allocating the big ones
        return _params(build_model(name, num_classes, in_channels=in_channels))


@pytest.mark.parametrize(
    "name, in_channels, size",
    [("cifar_resnet20", 3, 32), ("cifar_resnet20_s2", 1, 28), ("cifar_resnet8x4", 3, 32), ("cifar_resnet8x4_s2", 1, 28)],
)
def test_output_shapes(name, in_channels, size):
    model = build_model(name, 7, in_channels=in_channels)
    assert model(torch.randn(2, in_channels, size, size)).shape == (2, 7)


def test_stride2_stem_quarters_the_feature_maps():
    x = torch.randn(2, 1, 28, 28)
    full, s2 = build_model("cifar_resnet20", 10, in_channels=1), build_model("cifar_resnet20_s2", 10, in_channels=1)
    assert full.features[:-2](x).shape == (2, 64, 7, 7)
    assert s2.features[:-2](x).shape == (2, 64, 4, 4)
    assert _params(full) == _params(s2)  # same weights, cheaper maps


def test_resnet20_parameter_count_by_hand():
    def conv(cin: int, cout: int, k: int = 3) -> int:
        return cin * cout * k * k

    def bn(c: int) -> int:
        return 2 * c

    def block(cin: int, cout: int) -> int:
        shortcut = conv(cin, cout, 1) + bn(cout) if cin != cout else 0
        return conv(cin, cout) + bn(cout) + conv(cout, cout) + bn(cout) + shortcut

    stem = conv(3, 16) + bn(16)
    stages = sum(block(cin, cout) + 2 * block(cout, cout) for cin, cout in ((16, 16), (16, 32), (32, 64)))
    expected = stem + stages + 64 * 10 + 10
    assert _params(build_model("cifar_resnet20", 10)) == expected
    assert round(expected / 1e6, 2) == 0.27  # He et al. 2016, table 6


@pytest.mark.parametrize(
    "name, millions",
    [("cifar_resnet8", 0.08), ("cifar_resnet32", 0.47), ("cifar_resnet56", 0.86), ("cifar_resnet110", 1.73),
     ("cifar_resnet8x4", 1.23), ("cifar_resnet32x4", 7.43)],
)  # fmt: skip
def test_parameter_counts_match_crd_on_cifar100(name, millions):
    assert _meta_params(name, 100) / 1e6 == pytest.approx(millions, abs=0.01)  # as CRD tabulates them


def test_every_conv_has_batchnorm_and_kaiming_init():
    torch.manual_seed(0)
    model = build_model("cifar_resnet20", 10)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(convs) == 21 and len(bns) == len(convs)  # 19 3x3 layers + 2 projection shortcuts
    w = model.features[-3].conv2.weight  # 64x64x3x3
    assert w.std().item() == pytest.approx(math.sqrt(2 / (64 * 9)), rel=0.05)  # fan_out; PyTorch's default is ~0.024


@pytest.mark.parametrize("name", ["cifar_resnet21", "cifar_resnet2", "cifar_resnet18x4_s2"])
def test_bad_depth_is_one_line_naming_the_key(name):
    with pytest.raises(UserError) as e:
        check_model_name(name, "model.student")
    msg = str(e.value)
    assert "model.student" in msg and "6n+2" in msg and name in msg and "\n" not in msg
    with pytest.raises(UserError, match="6n\\+2"):
        build_model(name, 10, role="teacher")


def test_zero_width_is_refused():
    with pytest.raises(UserError, match="model.teacher.*width x0"):
        check_model_name("cifar_resnet20x0", "model.teacher")


def test_names_do_not_shadow_torchvision():
    assert check_model_name("resnet18", "model.student") == "torchvision"
    assert type(build_model("resnet18", 10)).__module__.startswith("torchvision")
    assert check_model_name("cifar_resnet8x4", "model.student") == "local"
    with pytest.raises(UserError, match="did you mean cifar_resnet20,"):
        check_model_name("resnet20", "model.student")
    with pytest.raises(UserError) as e:
        check_model_name("resnet21", "model.student")  # no CIFAR ResNet has depth 21: no hint
    assert "did you mean" not in str(e.value)


def test_meta_device_build_and_fingerprint():
    with torch.device("meta"):
        model = build_model("cifar_resnet8x4_s2", 1, in_channels=1)
    assert next(model.parameters()).is_meta
    fp = architecture_fingerprint("cifar_resnet20")
    assert ["features.0.weight", [16, 1, 3, 3]] in fp and fp[-1] == ["fc.bias", [1]]
    assert fp != architecture_fingerprint("cifar_resnet20x2")


def test_cifar_resnet_pair_trains_through_the_cli(tmp_path):
    rc, out, err = run_cli(
        ["train", str(REPO / "configs" / "digits_wsld.yaml"), *TINY, "train.epochs=1", "teacher_train.epochs=1",
         "model.teacher=cifar_resnet14_s2", "model.student=cifar_resnet8_s2", f"model.teacher_cache={tmp_path / 'cache'}",
         "distill.allow_weak_teacher=true",  # one teacher epoch on 8x8 digits: the plumbing is tested, not accuracy
         "--out", str(tmp_path / "run")]
    )  # fmt: skip
    assert rc == 0, err
    kinds = [r["kind"] for r in records(tmp_path / "run")]
    assert "teacher_eval" in kinds and kinds.count("eval") == 1
