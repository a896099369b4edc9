"""The benchmark scripts run end to end on a tiny size and print their tables (no timing is
checked here: speed figures live in BENCHMARKS.md). Results go to a temp file, never bench/results."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "bench"
TINY_PAIR = ["--teacher", "cnn_teacher", "--student", "cnn_student", "--classes", "10"]
# A stand-in for a checkout of the reference (bench/step.py --reference-dir), written by the test: the
# interface bench/step.py relies on (WSLDistiller(t_net, s_net), forward(x, label) -> (logits, loss)),
# the reference's .cuda() calls, and checks that the step runs it as the reference's loop does
FAKE_REFERENCE = """
import torch
import torch.nn as nn
import torch.nn.functional as F


class WSLDistiller(nn.Module):
    def __init__(self, t_net, s_net):
        super().__init__()
        self.t_net, self.s_net = t_net, s_net
        self.softmax = nn.Softmax(dim=1).cuda()

    def forward(self, x, label):
        assert torch.is_grad_enabled() and self.t_net.training and self.s_net.training
        assert all(p.requires_grad for p in self.t_net.parameters())  # the teacher's graph is kept
        fc_t, fc_s = self.t_net(x), self.s_net(x)
        zero = torch.zeros(1).cuda()  # on a CPU run, step.py sends this to the CPU
        soft = -(self.softmax(fc_t / 2) * F.log_softmax(fc_s / 2, dim=1)).sum(1, keepdim=True)
        return fc_s, F.cross_entropy(fc_s, label) + torch.max(soft, zero).mean()
"""


def run(script: str, *args: str, check: bool = True, timeout: int = 120) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run([sys.executable, str(BENCH / script), *args], capture_output=True, text=True, env=env,
                          timeout=timeout, cwd=REPO)  # fmt: skip
    if check:
        assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def load(script: str):
    """The script as a module, in this process (torch is imported already: fast)."""
    spec = importlib.util.spec_from_file_location(f"bench_{Path(script).stem}", BENCH / script)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("script", ["step.py", "loss.py", "train_throughput.py"])
def test_help(script, capsys):
    with pytest.raises(SystemExit) as e:
        load(script).main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "usage:" in out and "--out" in out


def test_step_then_loss_tables_and_records(tmp_path):
    step_json, loss_json = tmp_path / "step.json", tmp_path / "loss.json"
    out = run("step.py", *TINY_PAIR, "--image-size", "28", "--batch-size", "4", "--iters", "2", "--warmup", "1",
              "--threads", "1", "--out", str(step_json)).stdout  # fmt: skip
    for row in ("wsld waste (c)/((a)+(b))", "kd distillation overhead (c)/(a)", "(b) teacher inference",
                "(c) wsld step", "(c) ce step", "finite check off"):  # fmt: skip
        assert row in out
    (rec,) = json.loads(step_json.read_text())
    res = rec["results"][0]
    assert rec["batch_size"] == 4 and rec["device_type"] == "cpu" and res["config"] == "fp32"
    assert len(res["times_ms"]["(c) wsld step"]["values"]) == 2 and res["skipped_steps"] == 0
    assert all(t["median"] > 0 for t in res["times_ms"].values())

    out = run("loss.py", "--batch-size", "16", "--classes", "10", "--iters", "2", "--warmup", "1", "--threads", "1",
              "--step-json", str(step_json), "--out", str(loss_json)).stdout  # fmt: skip
    assert "16 x 10 float32 logits" in out and "share of the wsld step" in out and "batch 4 x 10 classes" in out
    (lrec,) = json.loads(loss_json.read_text())
    (vs,) = lrec["vs_step"]
    assert vs["step_ms"] == res["times_ms"]["(c) wsld step"]["median"]
    assert set(vs["fraction_of_step"]) == {"wsld", "kd", "ce"} and vs["fraction_of_step"]["wsld"] > 0


def test_step_times_the_reference_step_from_its_dir(tmp_path):
    ref = tmp_path / "ref"
    ref.mkdir()
    (ref / "knowledge_distiller.py").write_text(FAKE_REFERENCE)
    step_json = tmp_path / "step.json"
    pair = [*TINY_PAIR[:-1], "1000"]  # the reference's loss fixes 1000 classes
    out = run("step.py", *pair, "--image-size", "28", "--batch-size", "4", "--iters", "2", "--warmup", "1", "--threads", "1",
              "--losses", "wsld,ce", "--reference-dir", str(ref), "--out", str(step_json)).stdout  # fmt: skip
    for row in ("reference waste (r)/((a)+(b))", "reference step / our wsld step (r)/(c)", "(r) reference step"):
        assert row in out
    (rec,) = json.loads(step_json.read_text())
    res = rec["results"][0]
    assert rec["reference"]["dir"] == str(ref.resolve()) and rec["reference"]["cuda_calls_to_cpu"] is True
    assert len(rec["reference"]["knowledge_distiller.py_sha256"]) == 64
    assert len(res["times_ms"]["(r) reference step (its WSLDistiller, fp32)"]["values"]) == 2
    assert res["reference_nonfinite_steps"] == 0 and res["ratios"]["reference waste (r)/((a)+(b))"]["of_medians"] > 0


def test_step_reference_dir_that_does_not_import_is_one_line(tmp_path, capsys):
    ref = tmp_path / "ref"
    ref.mkdir()
    (ref / "knowledge_distiller.py").write_text("from imagenet_train_cfg import cfg\n")
    out = tmp_path / "r.json"
    with pytest.raises(SystemExit) as e:
        load("step.py").main(["--reference-dir", str(ref), "--out", str(out)])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "imagenet_train_cfg" in err and "Traceback" not in err
    assert not out.exists()


@pytest.mark.parametrize(
    "script, args, words",
    [
        ("step.py", ["--configs", "fp32+turbo"], "turbo"),
        ("step.py", ["--reference-dir", "/nonexistent/wsl"], "no knowledge_distiller.py"),
        ("step.py", ["--reference-dir", "/nonexistent/wsl", "--classes", "10"], "--classes 1000"),
        ("step.py", ["--losses", "wsld,dkd"], "dkd"),
        ("loss.py", ["--dtypes", "float8"], "float8"),
        ("train_throughput.py", ["--pairs", "resnet18"], "TEACHER:STUDENT"),
    ],
)
def test_bad_arguments_give_one_line_and_exit_2(script, args, words, tmp_path, capsys):
    out = tmp_path / "r.json"
    with pytest.raises(SystemExit) as e:
        load(script).main([*args, "--out", str(out)])
    assert e.value.code == 2 and words in capsys.readouterr().err
    assert not out.exists()


def test_train_throughput_runs_wsld_train(tmp_path):
    out_json = tmp_path / "tp.json"
    out = run("train_throughput.py", "--images", "48", "--classes", "4", "--val-per-class", "1", "--image-size", "32",
              "--batch-size", "8", "--pairs", "cnn_teacher:cnn_student", "--workers", "0", "--log-every", "2",
              "--workdir", str(tmp_path / "work"), "--out", str(out_json), timeout=240).stdout  # fmt: skip
    assert "cnn_teacher -> cnn_student" in out and "data wait" in out
    (rec,) = json.loads(out_json.read_text())
    (r,) = rec["runs"]
    # 48 images / batch 8 = 6 steps, windows of 2: the first is warm-up, two remain
    assert r["windows"] == 2 and r["images"] == 32 and r["workers"] == 0
    assert r["img_per_s"] > 0 and 0.0 <= r["data_wait_frac"] <= 1.0


def test_gpu_e2e_pools_only_whole_windows_after_the_warm_up(tmp_path):
    e2e = load("gpu_e2e.py")
    recs = [{"kind": "start", "amp": "torch.bfloat16", "channels_last": True}]
    # windows of 10 steps at batch 8: the first two are warm-up, the last (1 step) is not whole
    for step, ips, wait, busy in [(10, 100.0, 0.9, 0.1), (20, 200.0, 0.5, 0.5), (30, 400.0, 0.1, 0.9), (40, 800.0, 0.0, 1.0), (41, 5.0, 1.0, 0.0)]:
        recs.append({"kind": "train", "epoch": 1, "step": step, "img_per_s": ips, "data_wait_frac": wait, "gpu_busy_frac": busy})
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    got = e2e.steady(metrics, warmup_steps=20, log_every=10, batch=8)
    secs = [80 / 400, 80 / 800]
    assert got["timed_steps"] == 20
    assert got["img_per_s"] == pytest.approx(160 / sum(secs))
    assert got["data_wait_frac"] == pytest.approx(0.1 * secs[0] / sum(secs))
    assert got["gpu_busy_frac"] == pytest.approx((0.9 * secs[0] + 1.0 * secs[1]) / sum(secs))
    assert e2e.config_of(recs[0], ["model.compile=true"]) == "bf16+cl+compile"
    assert e2e.config_of({"amp": "None", "channels_last": False}, []) == "fp32"


def test_own_photos_recipe_times_both_readme_commands(tmp_path):
    """bench/own_photos_recipe.py, tiny: photos made, stand-in ImageNet files cached, both commands timed."""
    out = run("own_photos_recipe.py", "--out", str(tmp_path / "work"), "--photos", "40", "--results", str(tmp_path / "r.json"),
              "data.image_size=32", "data.val_resize=36", "data.batch_size=8", "data.workers=0", "train.epochs=1",
              "teacher_train.epochs=1", "model.teacher=shufflenet_v2_x0_5", "model.student=shufflenet_v2_x0_5",
              "distill.allow_weak_teacher=true", timeout=300).stdout  # fmt: skip
    assert "teacher" in out and "student" in out and "CPU s" in out
    rec = json.loads((tmp_path / "r.json").read_text())
    assert all(rec[k]["wall_s"] > 0 and rec[k]["cpu_s"] > 0 for k in ("teacher", "student"))
    assert (tmp_path / "work" / "runs" / "student" / "summary.json").is_file()
