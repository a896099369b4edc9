"""Bad input to ``wsld train`` / ``wsld eval``: one clear line naming what is wrong, exit code 2,
and no run directory that looks like a finished (or even started) run."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from engine_helpers import TINY, digits_teacher, one_error_line, run_cli  # noqa: F401

from wsld.config import load_config
from wsld.run import build_trainer
from wsld.runtime import Runtime
from wsld.errors import UserError


def _refused(tmp_path: Path, teacher_cache: str, *args: str) -> str:
    """Run `wsld train` with ``args``; assert exit 2, one line, and no run directory; return the line."""
    out = tmp_path / "run"
    rc, stdout, err = run_cli(["train", *TINY, teacher_cache, *args, "--out", str(out)])
    assert rc == 2, f"exit {rc}\n{err}"
    assert not out.exists(), sorted(p.name for p in out.iterdir())
    return one_error_line(err)


@pytest.mark.parametrize(
    "args, words",
    [
        (["train.epoch=3"], ["train.epoch"]),  # unknown key (typo)
        (["data.batch_sise=64"], ["data.batch_sise"]),
        (["train.epochs=three"], ["train.epochs"]),  # wrong type
        (["distill.alpha=-1"], ["distill.alpha", ">= 0"]),
        (["distill.T=0"], ["distill.T", "> 0"]),
        (["distill.loss=crd"], ["distill.loss", "crd", "wsld"]),  # not a registered loss
        (["model.student=resnet1800"], ["model.student", "resnet1800"]),
        (["model.teacher=vit_huge_typo"], ["model.teacher", "vit_huge_typo"]),
        (["data.dataset=svhn"], ["data.dataset", "svhn", "cifar100", "digits"]),
        (["train.amp=fp16"], ["train.amp", "fp16", "CUDA"]),  # fp16 + GradScaler is CUDA-only
        (["model.teacher_bn_mode=frozen"], ["model.teacher_bn_mode"]),
        (["data.batch_size=5000"], ["data.batch_size", "5000"]),
        (["data.dataset=fashion-mnist", "data.data_path=/nonexistent/fmnist"], ["/nonexistent/fmnist"]),
        (["data.format=folder", "data.data_path=/nonexistent/imagenet"], ["data.data_path", "/nonexistent/imagenet"]),
    ],
)
def test_bad_config_values_are_refused_before_anything_runs(tmp_path, teacher_cache, args, words):
    line = _refused(tmp_path, teacher_cache, *args)
    for w in words:
        assert w in line, (w, line)
    assert not (tmp_path / "teacher_cache").exists()  # no teacher was trained for a doomed run


def test_override_without_equals_and_missing_config_file(tmp_path, teacher_cache):
    assert "train.epochs" in _refused(tmp_path, teacher_cache, "train.epochs")
    rc, _, err = run_cli(["train", str(tmp_path / "nope.yaml"), "--out", str(tmp_path / "run")])
    assert rc == 2 and "nope.yaml" in one_error_line(err) and not (tmp_path / "run").exists()


def test_teacher_file_that_is_not_a_checkpoint(tmp_path, teacher_cache):
    bogus = tmp_path / "teacher.pt"
    bogus.write_bytes(b"PK\x03\x04 definitely not a torch file")
    line = _refused(tmp_path, teacher_cache, f"model.teacher_weights={bogus}")
    assert str(bogus) in line and "weights" in line


def test_teacher_checkpoint_of_another_architecture(tmp_path, teacher_cache, digits_teacher):  # noqa: F811
    line = _refused(tmp_path, teacher_cache, f"model.teacher_weights={digits_teacher}", "model.teacher=cnn_student")
    assert "does not fit model 'cnn_student'" in line


def test_teacher_with_other_class_count(tmp_path, teacher_cache):
    from wsld.models import build_model

    path = tmp_path / "teacher_7_classes.pt"
    torch.save(build_model("cnn_teacher", 7, in_channels=1).state_dict(), path)
    line = _refused(tmp_path, teacher_cache, f"model.teacher_weights={path}")
    assert "7 outputs" in line and "10 classes" in line


def _list_dataset(root: Path, bad_label: int) -> None:
    from PIL import Image

    for split in ("train", "val"):
        (root / split / "a").mkdir(parents=True)
        for i in range(4):
            Image.new("RGB", (16, 16), (40 * i, 80, 120)).save(root / split / "a" / f"{i}.png")
    (root / "classes.txt").write_text("a\nb\n")
    (root / "train_list.txt").write_text("".join(f"a/{i}.png\t{bad_label if i == 2 else 0}\n" for i in range(4)))
    (root / "val_list.txt").write_text("".join(f"a/{i}.png\t0\n" for i in range(4)))


def test_target_index_beyond_the_class_count(tmp_path, teacher_cache):
    _list_dataset(tmp_path / "data", bad_label=5)
    line = _refused(tmp_path, teacher_cache, "data.format=list", f"data.data_path={tmp_path / 'data'}",
                    "data.batch_size=2", "distill.loss=ce", "data.image_size=8")  # fmt: skip
    assert "5" in line and "2 classes" in line


def test_empty_split(tmp_path, teacher_cache):
    root = tmp_path / "data"
    _list_dataset(root, bad_label=0)
    (root / "val_list.txt").write_text("")
    line = _refused(tmp_path, teacher_cache, "data.format=list", f"data.data_path={root}", "data.batch_size=2",
                    "distill.loss=ce", "data.image_size=8")  # fmt: skip
    assert "val" in line and "empty" in line


def test_batch_not_divisible_by_the_number_of_processes(tmp_path):
    cfg = load_config(None, TINY + ["data.batch_size=127", f"model.teacher_cache={tmp_path / 'c'}"])
    trainer = build_trainer(cfg, tmp_path / "run", Runtime(torch.device("cpu"), rank=0, world_size=2))
    with pytest.raises(UserError, match="127 is not divisible by the 2 processes"):
        trainer.fit()  # refused before any collective call or file
    assert not (tmp_path / "run").exists()


def test_resume_errors(tmp_path):
    rc, _, err = run_cli(["train", "--resume", str(tmp_path / "never_ran")])
    assert rc == 2 and "never_ran" in one_error_line(err)
    rc, _, err = run_cli(["eval", str(tmp_path / "missing.pt")])
    assert rc == 2 and "missing.pt" in one_error_line(err)
    not_ck = tmp_path / "last.pt"
    torch.save({"weights": torch.zeros(2)}, not_ck)
    rc, _, err = run_cli(["eval", str(not_ck)])
    assert rc == 2 and "not a wsld checkpoint" in one_error_line(err)
