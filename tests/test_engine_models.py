"""Teachers and students by name and from local files (.pt state dicts, .safetensors, wsld checkpoints)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from engine_helpers import digits_teacher, load_ck  # noqa: F401  (fixture)
from safetensors.torch import save_file
from torch import nn

from wsld.errors import CheckpointError, UserError
from wsld.models import build_model, check_model_name, num_outputs


def _same_weights(model: nn.Module, state: dict) -> bool:
    own = model.state_dict()
    return own.keys() == state.keys() and all(torch.equal(own[k], state[k]) for k in own)


def _trained_like_teacher(num_classes: int = 10) -> dict:
    torch.manual_seed(1)
    return build_model("cnn_teacher", num_classes, in_channels=1).state_dict()


def test_teacher_from_torch_state_dict_and_safetensors(tmp_path):
    state = _trained_like_teacher()
    pt, st = tmp_path / "teacher.pt", tmp_path / "teacher.safetensors"
    torch.save(state, pt)
    save_file({k: v.contiguous() for k, v in state.items()}, str(st))
    for path in (pt, st):
        model = build_model("cnn_teacher", 10, in_channels=1, weights=str(path), role="teacher")
        assert _same_weights(model, state)
    # DDP / torch.compile prefixes are stripped
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, tmp_path / "ddp.pth")
    assert _same_weights(build_model("cnn_teacher", 10, in_channels=1, weights=str(tmp_path / "ddp.pth"), role="teacher"), state)


def test_teacher_from_a_wsld_checkpoint(digits_teacher):  # noqa: F811
    run_ck = Path(digits_teacher).parent / "run" / "last.pt"  # the teacher's own training run
    ck = load_ck(run_ck)
    assert ck["format"] == "wsld-checkpoint-1" and ck["student_arch"] == "cnn_teacher"
    model = build_model("cnn_teacher", 10, in_channels=1, weights=str(run_ck), role="teacher")
    assert _same_weights(model, ck["student"])


def test_unknown_torchvision_weight_name_lists_the_allowed_ones():
    with pytest.raises(UserError) as e:
        build_model("resnet18", 1000, weights="IMAGENET1K_V9", role="teacher")
    msg = str(e.value)
    assert "IMAGENET1K_V9" in msg and "IMAGENET1K_V1" in msg and "model.teacher_weights" in msg
    with pytest.raises(UserError, match="no pretrained weights by name"):
        build_model("cnn_teacher", 10, in_channels=1, weights="IMAGENET1K_V1", role="teacher")


def test_unknown_model_name():
    with pytest.raises(UserError, match="unknown model 'resnet1800'"):
        check_model_name("resnet1800", "model.student")
    assert check_model_name("resnet34", "model.teacher") == "torchvision"
    assert check_model_name("mobilenet_v1", "model.student") == "local"


def test_class_count_mismatch_is_explained_and_replace_head_is_explicit(tmp_path):
    path = tmp_path / "ten_classes.pt"
    state = _trained_like_teacher(10)
    torch.save(state, path)
    with pytest.raises(UserError) as e:
        build_model("cnn_teacher", 5, in_channels=1, weights=str(path), role="teacher")
    assert "10 outputs" in str(e.value) and "5 classes" in str(e.value)
    with pytest.raises(UserError, match="model.replace_head=true"):
        build_model("cnn_teacher", 5, in_channels=1, weights=str(path), role="student")
    model = build_model("cnn_teacher", 5, in_channels=1, weights=str(path), replace_head_if_needed=True, role="student")
    assert num_outputs(model) == 5
    kept = {k: v for k, v in state.items() if not k.startswith("fc.")}
    assert all(torch.equal(model.state_dict()[k], v) for k, v in kept.items())


def test_replace_head_on_a_torchvision_model_with_nested_classifier(tmp_path):
    torch.manual_seed(0)
    src = build_model("mobilenet_v3_small", 1000)
    path = tmp_path / "mnv3_imagenet.pt"
    torch.save(src.state_dict(), path)
    model = build_model("mobilenet_v3_small", 7, weights=str(path), replace_head_if_needed=True, role="student")
    assert num_outputs(model) == 7
    assert torch.equal(model.features[0][0].weight, src.features[0][0].weight)
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 7)


def test_files_that_are_not_checkpoints_are_refused(tmp_path):
    text = tmp_path / "teacher.pt"
    text.write_text("this is not a checkpoint\n")
    with pytest.raises(CheckpointError, match="not a loadable weights file"):
        build_model("cnn_teacher", 10, in_channels=1, weights=str(text), role="teacher")
    pickled = tmp_path / "whole_module.pt"
    torch.save(nn.Linear(2, 2), pickled)  # a pickled module: code, refused by weights_only=True
    with pytest.raises(CheckpointError, match="weights_only"):
        build_model("cnn_teacher", 10, in_channels=1, weights=str(pickled), role="teacher")
    bad_st = tmp_path / "teacher.safetensors"
    bad_st.write_bytes(b"\x00" * 16)
    with pytest.raises(CheckpointError, match="safetensors"):
        build_model("cnn_teacher", 10, in_channels=1, weights=str(bad_st), role="teacher")
    with pytest.raises(CheckpointError, match="not found"):
        build_model("cnn_teacher", 10, in_channels=1, weights=str(tmp_path / "teacher.ckpt"), role="teacher")


def test_checkpoint_of_another_architecture_is_refused(tmp_path):
    path = tmp_path / "student.pt"
    torch.save(build_model("cnn_student", 10, in_channels=1).state_dict(), path)
    with pytest.raises(CheckpointError, match="does not fit model 'cnn_teacher'"):
        build_model("cnn_teacher", 10, in_channels=1, weights=str(path), role="teacher")
