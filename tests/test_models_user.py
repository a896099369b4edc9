"""Users' own models as model.student / model.teacher = package.module:callable, without editing wsld."""

from __future__ import annotations

import itertools
import sys
import textwrap
from typing import Callable

import pytest
import torch
from engine_helpers import REPO, TINY, load_ck, run_cli
from torch import nn

from wsld.errors import UserError
from wsld.models import architecture_fingerprint, build_model, check_model_name

_ids = itertools.count()

MODELS = """
    import torch
    from torch import nn

    CALLS = []

    def tiny_net(num_classes):
        CALLS.append(num_classes)
        return nn.Sequential(nn.Flatten(), nn.Linear(64, num_classes))

    def small_cnn(num_classes, in_channels=3):
        return nn.Sequential(
            nn.Conv2d(in_channels, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, num_classes),
        )

    class KwargsNet(nn.Module):
        def __init__(self, **kwargs):
            super().__init__()
            self.seen = kwargs
            self.fc = nn.Linear(64, kwargs["num_classes"])

    def all_conv(num_classes):
        return nn.Sequential(nn.Conv2d(1, num_classes, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten())

    def cpu_only(num_classes):
        hidden = int(torch.tensor(16).item())  # reads a value: fails on the meta device
        return nn.Sequential(nn.Flatten(), nn.Linear(64, hidden), nn.Linear(hidden, num_classes))

    def raises(num_classes):
        raise RuntimeError("out of ideas")

    def not_a_module(num_classes):
        return 42

    def no_classes():
        return nn.Linear(64, 10)

    NOT_CALLABLE = 3
"""


@pytest.fixture
def user_module(tmp_path, monkeypatch) -> Callable[[str], str]:
    """Writes a module into tmp_path (the current directory, not on sys.path) and returns its name."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", ".", str(tmp_path))])
    names: list[str] = []

    def write(source: str) -> str:
        name = f"wsld_user_models_{next(_ids)}"
        (tmp_path / f"{name}.py").write_text(textwrap.dedent(source))
        names.append(name)
        return name

    yield write
    for name in names:
        sys.modules.pop(name, None)


def test_build_from_the_current_directory(user_module):
    mod = user_module(MODELS)
    model = build_model(f"{mod}:tiny_net", 10, in_channels=1)
    assert model(torch.zeros(3, 1, 8, 8)).shape == (3, 10)
    assert sys.modules[mod].CALLS == [10]


def test_in_channels_is_passed_only_where_the_callable_takes_it(user_module):
    mod = user_module(MODELS)
    assert build_model(f"{mod}:small_cnn", 4, in_channels=1)[0].in_channels == 1
    assert build_model(f"{mod}:KwargsNet", 4, in_channels=1).seen == {"num_classes": 4, "in_channels": 1}
    assert build_model(f"{mod}:tiny_net", 4, in_channels=3)[1].out_features == 4  # called without in_channels


def test_check_is_cheap_and_builds_nothing(user_module):
    mod = user_module(MODELS)
    assert check_model_name(f"{mod}:tiny_net", "model.student") == "user"
    assert sys.modules[mod].CALLS == []


def test_weights_file_and_head_without_linear(user_module, tmp_path):
    mod = user_module(MODELS)
    torch.manual_seed(3)
    src = build_model(f"{mod}:small_cnn", 10, in_channels=1)
    torch.save(src.state_dict(), tmp_path / "w.pt")
    model = build_model(f"{mod}:small_cnn", 10, in_channels=1, weights=str(tmp_path / "w.pt"), role="teacher")
    assert torch.equal(model[0].weight, src[0].weight)
    conv = build_model(f"{mod}:all_conv", 5, in_channels=1)
    assert conv(torch.zeros(2, 1, 8, 8)).shape == (2, 5)
    torch.save(conv.state_dict(), tmp_path / "conv.pt")
    loaded = build_model(f"{mod}:all_conv", 5, in_channels=1, weights=str(tmp_path / "conv.pt"), role="teacher")
    assert torch.equal(loaded[0].weight, conv[0].weight)


def test_fingerprint_on_meta_and_cpu_fallback(user_module):
    mod = user_module(MODELS)
    assert architecture_fingerprint(f"{mod}:small_cnn")[0] == ["0.weight", [8, 3, 3, 3]]
    with pytest.raises(UserError, match="raised"), torch.device("meta"):
        build_model(f"{mod}:cpu_only", 1)
    assert architecture_fingerprint(f"{mod}:cpu_only")[-1] == ["2.bias", [1]]


@pytest.mark.parametrize(
    "spec, expected",
    [
        ("{mod}:tiny_nett", "has no 'tiny_nett'"),
        ("{mod}:NOT_CALLABLE", "is not callable (it is int)"),
        ("{mod}:no_classes", "takes no num_classes"),
        ("no_such_module_xyz:net", "no module 'no_such_module_xyz'"),
        ("{mod}", None),  # no colon: an unknown name, not a user model
        ("{mod}:", "package.module:callable"),
    ],
)
def test_check_errors_name_the_key(user_module, spec, expected):
    mod = user_module(MODELS)
    with pytest.raises(UserError) as e:
        check_model_name(spec.format(mod=mod), "model.student")
    msg = str(e.value)
    assert "model.student" in msg and "\n" not in msg
    assert ("unknown model" if expected is None else expected) in msg


@pytest.mark.parametrize(
    "callable_name, expected",
    [("raises", "raised RuntimeError: out of ideas"), ("not_a_module", "returned int, not a torch.nn.Module")],
)
def test_build_errors_name_the_key(user_module, callable_name, expected):
    mod = user_module(MODELS)
    with pytest.raises(UserError) as e:
        build_model(f"{mod}:{callable_name}", 10, in_channels=1, role="teacher")
    assert "model.teacher" in str(e.value) and expected in str(e.value) and "num_classes=10" in str(e.value)


def test_broken_module_and_missing_dependency(user_module):
    broken = user_module("def net(num_classes):\n    return (\n")
    with pytest.raises(UserError, match=f"model.student.*importing '{broken}' failed \\(SyntaxError"):
        check_model_name(f"{broken}:net", "model.student")
    needs = user_module("import no_such_dependency_xyz\n")
    with pytest.raises(UserError, match="importing .* failed: No module named 'no_such_dependency_xyz' \\(install it\\)"):
        check_model_name(f"{needs}:net", "model.student")


def test_user_student_and_teacher_train_through_the_cli(user_module, tmp_path):
    mod = user_module(MODELS)
    rc, out, err = run_cli(
        ["train", str(REPO / "configs" / "digits_wsld.yaml"), *TINY, "train.epochs=1", "teacher_train.epochs=1",
         f"model.student={mod}:tiny_net", f"model.teacher={mod}:small_cnn", f"model.teacher_cache={tmp_path / 'cache'}",
         "distill.allow_weak_teacher=true",  # a one-epoch user teacher: the plumbing is tested, not accuracy
         "--out", str(tmp_path / "run")]
    )  # fmt: skip
    assert rc == 0, err
    assert load_ck(tmp_path / "run" / "last.pt")["student_arch"] == f"{mod}:tiny_net"


def test_cli_error_is_exit_2_naming_the_key(user_module, tmp_path):
    mod = user_module(MODELS)
    rc, out, err = run_cli(
        ["train", str(REPO / "configs" / "digits_wsld.yaml"), *TINY, f"model.student={mod}:missing",
         "--out", str(tmp_path / "run")]
    )  # fmt: skip
    assert rc == 2 and "model.student" in err and "has no 'missing'" in err and "Traceback" not in err
