"""``wsld demo`` is ``wsld compare`` on the built-in Fashion-MNIST: ``--quick`` says everywhere that it is a pipeline
check, writes its own folder (runs/demo-quick, not the full demo's runs/demo), a folder holding other settings is
refused before anything is written with the command that clears or bypasses it, and ``make demo ARGS=...`` passes
the arguments through."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from data_fixtures import error_line, wsld

REPO = Path(__file__).resolve().parents[1]


def test_quick_says_it_is_a_pipeline_check_not_a_comparison(tmp_path, capsys, monkeypatch):
    import wsld.demo.plots as plots

    texts: dict[str, list[str]] = {}
    real_save = plots.save_figure

    def recording_save(fig, path):  # every text drawn on the figure: titles, suptitle, figure texts
        found = [t.get_text() for t in fig.findobj(lambda a: hasattr(a, "get_text"))]
        texts[path.name] = [t for t in found if t]
        real_save(fig, path)

    monkeypatch.setattr(plots, "save_figure", recording_save)
    out = tmp_path / "quick"
    rc, stdout, err = wsld(capsys, "demo", "--quick", "--losses", "ce", "wsld", "--out", out, "--jobs", "1", "--threads",
                           "1", "--no-progress")  # fmt: skip
    assert rc == 0, err
    report = (out / "report.md").read_text(encoding="utf-8")
    for text in (stdout + err, report):
        assert "PIPELINE CHECK (--quick), NOT A COMPARISON" in text
        assert "ahead of" not in text and "behind" not in text and "level with" not in text and "95% CI" not in text
    assert report.index("NOT A COMPARISON") < report.index("## Results")  # said before any number
    assert texts and "paired_differences.png" not in texts
    for name, found in texts.items():
        joined = " ".join(found).lower()
        assert "pipeline check" in joined and "not a comparison" in joined, name
    res = json.loads((out / "results.json").read_text(encoding="utf-8"))
    assert res["settings"]["seeds"] == 1 and res["quick_note"]
    assert res["data"]["train_images"] == 600 and res["data"]["test_images"] == 600


def test_quick_and_full_demo_write_different_folders(tmp_path, monkeypatch, capsys):
    import wsld.demo.pipeline as pipeline

    seen = []
    monkeypatch.setattr(pipeline, "run_compare", lambda s, out, command, **kw: seen.append((out, s.seeds, command)) or 0)
    monkeypatch.chdir(tmp_path)
    assert wsld(capsys, "demo", "--quick")[0] == 0 and wsld(capsys, "demo")[0] == 0
    assert [(str(o), n) for o, n, _ in seen] == [("runs/demo-quick", 1), ("runs/demo", 3)]
    assert seen[0][2] == "wsld demo --quick" and seen[1][2] == "wsld demo"


def test_a_folder_of_other_settings_is_refused_before_anything_is_written(tmp_path, capsys):
    out = tmp_path / "demo"
    out.mkdir()
    (out / "compare.json").write_text(json.dumps({"seeds": 1, "rows": ["ce"]}), encoding="utf-8")
    (out / "mine.txt").write_text("the user's\n", encoding="utf-8")
    listing = sorted((str(p), p.stat().st_mtime_ns) for p in out.rglob("*"))
    rc, _, err = wsld(capsys, "demo", "--out", out, "--no-progress")
    line = error_line(err)
    assert rc == 2 and "other settings" in line and f"rm -rf {out}" in line and "--out runs/demo2" in line
    assert sorted((str(p), p.stat().st_mtime_ns) for p in out.rglob("*")) == listing
    other = tmp_path / "old"  # a folder that is not a comparison at all (e.g. an older demo's)
    (other / "runs").mkdir(parents=True)
    rc, _, err = wsld(capsys, "demo", "--quick", "--out", other)
    assert rc == 2 and f"rm -rf {other}" in error_line(err) and sorted(p.name for p in other.iterdir()) == ["runs"]


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_make_demo_passes_arguments_through():
    out = subprocess.run(["make", "-n", "-C", str(REPO), "demo", "ARGS=--quick --seeds 2"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "wsld demo --quick --seeds 2" in out.stdout
