"""A new user's first day (issue 22): pretrained starts for teacher and student, the small-data recipe,
messages for habits from other trainers, workers clipped to the cores, the run's console log, install files.

Nothing is downloaded: "ImageNet weights" are small random networks saved where torchvision's cache
looks for them (``$TORCH_HOME/hub/checkpoints/<file name of the weight's URL>``) or as local files.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import warnings
from pathlib import Path

import pytest
import torch
from data_fixtures import photo
from engine_helpers import REPO, TINY, WSLD, digits_teacher, load_ck, one_error_line, run_cli, run_sub  # noqa: F401 (fixture)
from safetensors.torch import load_file

CLASSES = ["cat", "dog", "fox"]


def photo_tree(root: Path, train: int = 6, val: int = 3) -> Path:
    """ROOT/train/<class>/*.jpg and ROOT/val/<class>/*.jpg: crops of real photos, 40x40."""
    for split, n, offset in (("train", train, 0), ("val", val, 50)):
        for c, name in enumerate(CLASSES):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(n):
                photo(100 * c + offset + i, 40, 40).save(folder / f"{i}.jpg")
    return root


def photo_args(root: Path) -> list[str]:
    return [
        "data.dataset=mine", "data.format=folder", f"data.data_path={root}", "data.image_size=32", "data.val_resize=36",
        "data.batch_size=6", "data.workers=0", "train.progress=false", "train.epochs=1", "teacher_train.epochs=1",
        "train.base_batch_size=6", "train.lr=0", "teacher_train.lr=0",  # lr 0: the trained weights stay the loaded ones
    ]  # fmt: skip


@pytest.fixture
def imagenet_shufflenet(tmp_path, monkeypatch) -> dict[str, torch.Tensor]:
    """A 1000-class shufflenet_v2_x0_5 (1.4M parameters, random) where torchvision's cache holds IMAGENET1K_V1."""
    import torchvision

    w = torchvision.models.ShuffleNet_V2_X0_5_Weights.IMAGENET1K_V1
    home = tmp_path / "torch_home"
    cached = home / "hub" / "checkpoints" / os.path.basename(w.url)
    cached.parent.mkdir(parents=True)
    torch.manual_seed(1)
    state = torchvision.models.shufflenet_v2_x0_5().state_dict()
    torch.save(state, cached)
    monkeypatch.setenv("TORCH_HOME", str(home))
    return state


def test_teacher_only_fine_tunes_imagenet_weights_then_a_pretrained_student_is_distilled(tmp_path, imagenet_shufflenet):
    root = photo_tree(tmp_path / "photos")
    common = [*photo_args(root), "model.teacher=shufflenet_v2_x0_5", "model.student=shufflenet_v2_x0_5"]
    teach = tmp_path / "teacher"
    rc, out, err = run_cli(["train", *common, "model.teacher_weights=IMAGENET1K_V1", "--teacher-only", "--out", str(teach)])
    assert rc == 0, err
    assert "is ignored" not in err and "teacher shufflenet_v2_x0_5 fine-tuned from IMAGENET1K_V1 with CE" in out
    assert "predicts 1000 classes, the data has 3: its classifier is replaced by a new 3-way head" in err
    teacher = load_file(teach / "teacher.safetensors")
    assert tuple(teacher["fc.weight"].shape) == (3, 1024)
    assert torch.equal(teacher["conv1.0.weight"], imagenet_shufflenet["conv1.0.weight"])  # it started from the ImageNet file
    # the printed second command distils from the fine-tuned teacher; the student starts from ImageNet weights too
    assert f"model.teacher_weights={teach / 'teacher.safetensors'}" in out
    student = tmp_path / "student"
    rc, out, err = run_cli(["train", *common, f"model.teacher_weights={teach / 'teacher.safetensors'}",
                            "model.student_weights=IMAGENET1K_V1", "distill.allow_weak_teacher=true", "--out", str(student)])  # fmt: skip
    assert rc == 0, err
    assert "predicts 1000 classes, the data has 3" in err
    weights = load_ck(student / "last.pt")["student"]
    assert torch.equal(weights["conv1.0.weight"], imagenet_shufflenet["conv1.0.weight"])
    assert tuple(weights["fc.weight"].shape) == (3, 1024)


def test_teacher_only_starts_from_a_local_file_and_replace_head_false_refuses(tmp_path):
    from wsld.models import CNNTeacher

    torch.manual_seed(0)
    start = CNNTeacher(num_classes=1000, in_channels=1).state_dict()
    torch.save(start, tmp_path / "imagenet_like.pth")
    args = ["train", *TINY, "teacher_train.epochs=1", "teacher_train.lr=0", f"model.teacher_weights={tmp_path / 'imagenet_like.pth'}", "--teacher-only"]
    rc, _, err = run_cli([*args, "model.replace_head=false", "--out", str(tmp_path / "refused")])
    assert rc == 2 and "has 1000 outputs but the data has 10 classes" in one_error_line(err) and not (tmp_path / "refused").exists()
    rc, _, err = run_cli([*args, "--out", str(tmp_path / "t")])
    assert rc == 0, err
    teacher = load_file(tmp_path / "t" / "teacher.safetensors")
    assert torch.equal(teacher["features.0.0.weight"], start["features.0.0.weight"]) and tuple(teacher["fc.weight"].shape) == (10, 64)


def test_an_imagenet_teacher_for_other_classes_gets_the_two_commands_before_any_download(tmp_path, monkeypatch):
    """Forgetting model.teacher_weights on your own data with the small-data recipe: no download, one line."""
    import torch.hub

    def no_download(*args, **kwargs):
        raise AssertionError("a download was attempted")

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty_torch_home"))
    monkeypatch.setattr(torch.hub, "download_url_to_file", no_download)
    root = photo_tree(tmp_path / "photos")
    out_dir = tmp_path / "student"
    config = str(REPO / "configs" / "own_photos_small.yaml")
    rc, _, err = run_cli(["train", config, f"data.data_path={root}", "data.batch_size=6", "--out", str(out_dir)])
    line = one_error_line(err)
    assert rc == 2 and "resnet18 with model.teacher_weights=IMAGENET1K_V1 has 1000 outputs but the data has 3 classes" in line
    assert (f"wsld train {config} data.data_path={root} data.batch_size=6 model.teacher_weights=IMAGENET1K_V1 --teacher-only "
            f"--out {out_dir}-teacher && wsld train {config} data.data_path={root} data.batch_size=6 "
            f"model.teacher_weights={out_dir}-teacher/teacher.safetensors --out {out_dir}") in line  # fmt: skip
    assert not out_dir.exists()


def test_timm_pretrained_weights_start_a_student_with_a_new_head(tmp_path, monkeypatch):
    """timm's ``pretrained`` reads the Hugging Face cache (offline here), then the head is replaced."""
    timm = pytest.importorskip("timm")
    from safetensors.torch import save_file

    name = "resnet10t.c3_in1k"
    cfg = timm.models.get_pretrained_cfg(name)
    hub = tmp_path / "hf" / "hub" / f"models--{cfg.hf_hub_id.replace('/', '--')}"
    snapshot = hub / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (hub / "refs").mkdir()
    (hub / "refs" / "main").write_text("0" * 40)
    torch.manual_seed(2)
    state = timm.create_model(name, pretrained=False).state_dict()
    save_file(state, snapshot / "model.safetensors")
    import huggingface_hub.constants as hf  # read its environment when imported: set its values

    monkeypatch.setattr(hf, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    monkeypatch.setattr(hf, "HF_HUB_OFFLINE", True)
    args = ["train", *TINY, "data.dataset=mine", "data.format=folder", f"data.data_path={photo_tree(tmp_path / 'photos')}",
            "data.image_size=32", "data.val_resize=36", "data.batch_size=6", "train.base_batch_size=6", "train.epochs=1",
            "train.lr=0", "distill.loss=ce", f"model.student=timm/{name}", "model.student_weights=pretrained", "--out", str(tmp_path / "s")]  # fmt: skip
    rc, _, err = run_cli(args)
    assert rc == 0, err
    assert "predicts 1000 classes, the data has 3" in err
    weights = load_ck(tmp_path / "s" / "last.pt")["student"]
    assert torch.equal(weights["conv1.0.weight"], state["conv1.0.weight"]) and tuple(weights["fc.weight"].shape)[0] == 3
    # the same weights as a distillation teacher: refused from timm's config (1000 classes), with the two commands
    teacher = [a.replace("model.student", "model.teacher") for a in args if a.startswith("model.student")]
    rc, _, err = run_cli([a for a in args if a != "distill.loss=ce" and not a.startswith("--out") and a != str(tmp_path / "s")]
                         + teacher + ["--out", str(tmp_path / "d")])  # fmt: skip
    line = one_error_line(err)
    assert rc == 2 and "has 1000 outputs but the data has 3 classes" in line and "model.teacher_weights=pretrained --teacher-only" in line


def test_the_small_data_recipe_fits_a_few_hundred_photos_on_a_cpu():
    from wsld.config import load_config

    cfg = load_config(REPO / "configs" / "own_photos_small.yaml", ["data.data_path=/photos"])
    assert cfg.data.format == "folder" and cfg.data.batch_size <= 32 and cfg.data.workers <= 2 and cfg.data.image_size <= 160
    assert (cfg.model.teacher_weights, cfg.model.student_weights, cfg.model.replace_head) == ("IMAGENET1K_V1", "IMAGENET1K_V1", None)
    assert cfg.train.epochs + cfg.teacher_train.epochs <= 20
    readme = (REPO / "README.md").read_text()
    assert "wsld train configs/own_photos_small.yaml data.data_path=ROOT --teacher-only --out runs/teacher" in readme
    assert ("wsld train configs/own_photos_small.yaml data.data_path=ROOT "
            "model.teacher_weights=runs/teacher/teacher.safetensors --out runs/student") in readme  # fmt: skip


# -- messages for habits from other trainers: one line, the command that works


@pytest.mark.parametrize(
    "flags, fixed",
    [(["--epochs", "3"], "train.epochs=3"), (["--lr=0.05"], "train.lr=0.05"), (["--batch-size", "32"], "data.batch_size_per_device=32"),
     (["--model", "resnet18"], "model.student=resnet18"), (["--pretrained", "--num-classes", "10"], "model.student_weights=pretrained")],
)  # fmt: skip
def test_timm_flags_get_the_key_value_that_works(flags, fixed):
    rc, _, err = run_cli(["train", "configs/digits_wsld.yaml", *flags, "--out", "runs/x"])
    line = one_error_line(err)
    assert rc == 2 and "timm's spelling" in line and line.endswith(f": wsld train configs/digits_wsld.yaml {fixed} --out runs/x"), line


def test_resume_given_a_checkpoint_file_names_the_folder(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("{}\n")
    (run / "last.pt").write_bytes(b"")
    rc, _, err = run_cli(["train", "--resume", str(run / "last.pt"), "train.epochs=5"])
    assert rc == 2 and one_error_line(err).endswith(f": wsld train --resume {run} train.epochs=5")


def test_a_data_folder_given_as_the_config_names_data_path(tmp_path):
    root = photo_tree(tmp_path / "photos", train=1, val=1)
    rc, _, err = run_cli(["train", str(root)])
    assert rc == 2 and one_error_line(err).endswith(f"wsld train configs/own_photos_small.yaml data.data_path={root}")


def test_a_photo_tree_given_to_a_built_in_dataset_names_the_folder_format(tmp_path, teacher_cache):
    root = photo_tree(tmp_path / "photos", train=1, val=1)
    rc, _, err = run_cli(["train", str(REPO / "configs" / "fashion_mnist_wsld.yaml"), f"data.data_path={root}", teacher_cache,
                          "--out", str(tmp_path / "run")])  # fmt: skip
    line = one_error_line(err)
    assert rc == 2 and "holds photos in class folders" in line and "apt-get" not in line
    assert f"wsld train configs/own_photos_small.yaml data.data_path={root}" in line and "data.format=folder" in line
    assert not (tmp_path / "run").exists() and not (tmp_path / "teacher_cache").exists()


# -- workers, console log


def test_more_workers_than_cores_are_clipped_with_one_line(tmp_path, digits_teacher):
    from wsld.runtime import usable_cores

    n = usable_cores() + 1
    p = run_sub([*WSLD, "train", *TINY, "train.epochs=1", f"data.workers={n}", f"model.teacher_weights={digits_teacher}",
                 "--out", str(tmp_path / "run")])  # fmt: skip
    assert p.returncode == 0, p.stderr
    assert f"data.workers={n} is more than the {n - 1} CPU cores this process can use" in p.stderr
    assert "suggested max number of worker" not in p.stderr  # torch's own warning, three times before


def test_a_run_keeps_its_console_output_in_log_txt(tmp_path, digits_teacher):
    run = tmp_path / "run"
    args = ["train", *TINY, "train.epochs=1", "train.progress=true", f"model.teacher_weights={digits_teacher}", "--out", str(run)]
    rc, out, err = run_cli(args)
    assert rc == 0, err
    log = (run / "log.txt").read_text()
    assert log.startswith(f"# wsld {' '.join(args)}")
    assert "[wsld] student epoch 1/1: top-1" in log and "wsld result: wsld" in log and "last.pt: the number to report" in log
    assert "\r" not in log and "it/s" not in log  # progress bars stay on the console
    rc, _, err = run_cli(["train", "--resume", str(run)])  # a resumed run appends to it
    assert rc == 0, err
    again = (run / "log.txt").read_text()
    assert again.startswith(log) and again.count("# wsld train") == 2


# -- install and files


def test_pyproject_builds_without_packaging_warnings():
    setuptools = pytest.importorskip("setuptools")
    if int(setuptools.__version__.split(".")[0]) < 77:
        pytest.skip("setuptools < 77 reads no SPDX license string")
    from setuptools.config.pyprojecttoml import apply_configuration
    from setuptools.dist import Distribution

    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        apply_configuration(Distribution(), REPO / "pyproject.toml")
    assert not [str(w.message) for w in seen if "setuptools" in type(w.message).__module__ or "Deprecat" in type(w.message).__name__]


def test_make_clean_keeps_runs(tmp_path):
    if shutil.which("make") is None:
        pytest.skip("no make")
    shutil.copy(REPO / "Makefile", tmp_path / "Makefile")
    (tmp_path / ".venv" / "bin").mkdir(parents=True)
    (tmp_path / "runs" / "mine").mkdir(parents=True)
    (tmp_path / "runs" / "mine" / "last.pt").write_bytes(b"results")
    subprocess.run(["make", "clean"], cwd=tmp_path, check=True, capture_output=True)
    assert not (tmp_path / ".venv").exists() and (tmp_path / "runs" / "mine" / "last.pt").read_bytes() == b"results"
