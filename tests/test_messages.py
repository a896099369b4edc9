"""Messages a new user meets: YAML syntax errors (tests/test_reliability_guards.py), a file that is not
a checkpoint, a Ctrl-C outside the training loop, and a re-run that would start beside an earlier run."""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from engine_helpers import TINY, digits_teacher, run_cli  # noqa: F401 (fixture)
from wsld.file_kinds import describe_file


def _write(kind: str, path: Path) -> Path:
    if kind == "text":
        path.write_text("epoch,top1\n1,50.0\n")
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "state_dict":
        torch.save({"conv.weight": torch.zeros(2)}, path)
    elif kind == "module":
        torch.save(torch.nn.Linear(2, 2), path)
    elif kind == "zip":
        with zipfile.ZipFile(path, "w") as z:
            z.writestr("notes.txt", "x")
    elif kind == "pickle":
        path.write_bytes(pickle.dumps({"a": 1}, protocol=2))
    elif kind == "npy":
        np.save(path, np.zeros(3))
        path = path.with_name(path.name + ".npy")
    elif kind == "torchscript":
        torch.jit.script(torch.nn.Linear(2, 2)).save(str(path))
    return path


KINDS = {
    "text": "a text file", "empty": "an empty file", "state_dict": "no 'student' entry", "module": "whole model",
    "zip": "zip archive that is not a PyTorch file", "pickle": "a Python pickle", "npy": "NumPy array",
    "torchscript": "TorchScript archive",
}  # fmt: skip


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")
@pytest.mark.parametrize("kind", sorted(KINDS))
@pytest.mark.parametrize("command", ["eval", "export"])
def test_a_file_that_is_not_a_checkpoint_is_named_for_what_it_is(tmp_path, command, kind):
    f = _write(kind, tmp_path / "model.pt")
    rc, out, err = run_cli([command, str(f)] + (["--format", "onnx"] if command == "export" else []))
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert rc == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert KINDS[kind] in lines[0] and "wsld checkpoint" in lines[0] and "last.pt" in lines[0], lines[0]
    assert "weights_only` set to `False`" not in err and "do those steps only" not in err  # never torch's advice to unpickle


def test_a_run_folder_given_as_a_checkpoint_points_at_its_files(tmp_path):
    (tmp_path / "last.pt").write_bytes(b"")
    rc, _, err = run_cli(["eval", str(tmp_path)])
    assert rc == 2 and "is a folder" in err and f"{tmp_path / 'last.pt'}" in err


def test_describe_file_reads_only_the_first_bytes(tmp_path):
    assert describe_file(tmp_path) == "a folder"
    (tmp_path / "w.safetensors").write_bytes((12).to_bytes(8, "little") + b'{"a":"bc"}  ')
    assert describe_file(tmp_path / "w.safetensors").startswith("a safetensors file")
    (tmp_path / "u.txt").write_bytes(("é" * 3000).encode())  # a 4 KiB read cuts a character in two
    assert describe_file(tmp_path / "u.txt") == "a text file"


def test_ctrl_c_outside_the_loop_says_how_to_continue(tmp_path, monkeypatch):
    import wsld.run

    def interrupted(cfg, run_dir, resume=False, **_):
        if marker.exists():
            (Path(run_dir) / "config.yaml").parent.mkdir(parents=True, exist_ok=True)
            (Path(run_dir) / "config.yaml").write_text("{}\n")
        raise KeyboardInterrupt

    marker = tmp_path / "write-config"
    monkeypatch.setattr(wsld.run, "run_training", interrupted)
    run = tmp_path / "run"
    rc, _, err = run_cli(["train", *TINY, "--out", str(run)])
    assert rc == 130 and "interrupted; nothing was written to" in err and "run the same command again" in err, err
    marker.touch()
    rc, _, err = run_cli(["train", *TINY, "--out", str(tmp_path / "run2")])
    assert rc == 130 and f"wsld train --resume {tmp_path / 'run2'}" in err, err


def test_a_rerun_in_a_new_default_folder_names_the_earlier_run(tmp_path, monkeypatch, digits_teacher):
    monkeypatch.chdir(tmp_path)
    args = ["train", *TINY, "train.epochs=1", f"model.teacher_weights={digits_teacher}"]
    rc, _, err = run_cli(args)
    assert rc == 0 and "same config already ran" not in err, err
    first = next((tmp_path / "runs").iterdir())
    rc, _, err = run_cli(args + ["train.log_every=2"])  # a key that does not change the maths: the same config
    assert rc == 0
    assert f"the same config already ran in {first} (finished, top-1" in err, err
    rc, _, err = run_cli(args + ["train.seed=1"])  # another config: no note
    assert rc == 0 and "same config already ran" not in err
