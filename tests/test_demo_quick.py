"""``wsld demo --quick`` says, in its console output, report and plots, that it is a pipeline check and
not a comparison, and prints no difference between losses as a result."""

from __future__ import annotations

import json

from wsld.cli import main


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
    argv = ["demo", "--quick", "--out", str(out), "--limit-per-class", "10", "--regimes", "small-data", "--batch-size", "16",
            "--jobs", "1", "--threads", "1", "--no-progress"]  # fmt: skip
    assert main(argv) == 0
    captured = capsys.readouterr()
    console = captured.out + captured.err
    report = (out / "report.md").read_text(encoding="utf-8")
    for text in (console, report):
        assert "PIPELINE CHECK (--quick), NOT A COMPARISON" in text
        assert "−" not in text.replace("Teacher − student", "")  # no "WSLD − CE" line
        assert "ahead of" not in text and "behind" not in text and "95% CI" not in text
    assert report.index("NOT A COMPARISON") < report.index("## Small data")  # said before any number
    assert texts and "paired_differences.png" not in texts
    for name, found in texts.items():
        joined = " ".join(found).lower()
        assert "pipeline check" in joined and "not a comparison" in joined, name
    assert not (out / "readme_table.md").exists()  # nothing to paste into the README
    res = json.loads((out / "results.json").read_text(encoding="utf-8"))
    assert res["settings"]["quick"] is True and res["settings"]["seeds"] == 1
