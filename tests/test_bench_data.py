"""bench/data_pipeline.py runs end to end on a tiny size (no reference checkout: its rows are
skipped), measures the packer's peak RSS in a fresh process that imports no torch, and refuses a
--reference-dir that is not a checkout of the reference with one line. No timing is checked here."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "bench" / "data_pipeline.py"


def run(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, env=env,
                          timeout=timeout, cwd=REPO)  # fmt: skip


def test_tiny_run_records_loaders_packing_rss_and_start_times(tmp_path):
    out = tmp_path / "r.json"
    proc = run("--images", "16", "--batch-size", "8", "--repeats", "1", "--rss-scale", "2", "--out", str(out),
               "--workdir", str(tmp_path / "work"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (rec,) = json.loads(out.read_text())
    assert rec["reference"] is None and rec["train_speedup_vs_reference"] is None
    assert {"wsld LMDB loader", "torchvision ImageFolder + ToTensor/Normalize"} <= set(rec["train_images_per_s_per_core"])
    rss = rec["peak_rss"]
    assert rss["wsld data pack, 16 images"]["torch_imported"] is False
    assert rss["wsld data pack, 32 images"]["peak_rss_mib"] >= rss["wsld imports only (wsld.cli, wsld.data.pack)"]["peak_rss_mib"]
    assert set(rec["start_seconds"]) >= {"wsld data --help", "wsld data list ROOT"}
    assert "train loader (1 thread)" in proc.stdout and "peak RSS of a fresh process" in proc.stdout


def test_a_reference_dir_without_the_reference_is_one_line_and_exit_2(tmp_path):
    (tmp_path / "dataset").mkdir()
    (tmp_path / "dataset" / "img2lmdb.py").write_text("")
    out = tmp_path / "r.json"
    proc = run("--reference-dir", str(tmp_path), "--out", str(out))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().count("\n") == 0 and "dataset/lmdb_dataset.py" in proc.stderr
    assert not out.exists()
