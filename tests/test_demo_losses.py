"""``wsld demo --losses``: the default rows, runs and grids are the pre-registered ones; DKD and DIST rows
with their published values and WSLD − DKD / WSLD − DIST differences, end to end on a tiny slice."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from wsld.cli import build_parser, main
from wsld.config import load_config, to_dict
from wsld.demo import plan
from wsld.demo.pipeline import settings_from_args
from wsld.demo.plan import DataPaths, Settings, plan_phase1, plan_students

PRE_REGISTERED_SEARCH = [
    "search-ce-lr0.025", "search-ce-lr0.05", "search-ce-lr0.1", "search-ce-lr0.2",
    "search-kd-lr0.05-T4", "search-kd-lr0.1-T4", "search-kd-lr0.05-T2", "search-kd-lr0.1-T2",
    "search-wsld-lr0.05-T2", "search-wsld-lr0.1-T2", "search-wsld-lr0.05-T4", "search-wsld-lr0.1-T4",
    "search-wsld_w1-lr0.05-T2", "search-wsld_w1-lr0.1-T2", "search-wsld_w1-lr0.05-T4", "search-wsld_w1-lr0.1-T4",
]  # fmt: skip
PRE_REGISTERED_DISTILL = {  # distill.{loss, T, alpha, params} of each row's first search run, as resolved
    "ce": ("ce", 4.0, None, {"ce": {}}), "kd": ("kd", 4.0, None, {"kd": {"alpha": 0.9}}),
    "wsld": ("wsld", 2.0, None, {"wsld": {"alpha": 2.5, "weighting": "on"}}),
    "wsld_w1": ("wsld", 2.0, None, {"wsld": {"alpha": 2.5, "weighting": "off"}}),
}  # fmt: skip


def _plan(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, s: Settings) -> tuple[list, list]:
    """Both phases of a full-size plan, with the class counts given (no data is read)."""
    monkeypatch.setattr(plan, "train_counts", lambda cfg: ([6000] * 10, 10000))
    paths = DataPaths(None, str(tmp_path / "small"), str(tmp_path / "search"))
    phase1, regimes = plan_phase1(tmp_path, paths, s)
    chosen = {r.key: {"lr": r.grid[0][0], "T": r.grid[0][1]} for r in s.chosen_rows}
    return phase1, plan_students(tmp_path, paths, s, regimes, chosen)


def _distill(sp) -> tuple:
    d = to_dict(sp.config)["distill"]
    return d["loss"], d["T"], d["alpha"], d["params"]


def test_default_rows_runs_and_grids_are_the_pre_registered_ones(tmp_path, monkeypatch):
    s = Settings()
    assert s.rows == ("ce", "kd", "wsld", "wsld_w1")
    phase1, phase2 = _plan(tmp_path, monkeypatch, s)
    assert [sp.name for sp in phase1 if sp.regime != "search"] == [
        f"{r}-{k}" for r in ("small-data", "balanced", "long-tail") for k in ("teacher", "store-s0", "store-s1", "store-s2")]
    search = [sp for sp in phase1 if sp.regime == "search"]
    assert [sp.name for sp in search] == PRE_REGISTERED_SEARCH
    assert [sp.grid for sp in search] == [(lr, None) for lr in (0.025, 0.05, 0.1, 0.2)] + [
        (lr, t) for ts in ((4.0, 2.0), (2.0, 4.0), (2.0, 4.0)) for t in ts for lr in (0.05, 0.1)]
    firsts = {sp.row: sp for sp in reversed(search)}
    assert {k: _distill(sp) for k, sp in firsts.items()} == PRE_REGISTERED_DISTILL
    assert [sp.name for sp in phase2] == [f"{r}-{k}-s{seed}" for r in ("balanced", "long-tail", "small-data")
                                          for seed in range(3) for k in ("ce", "kd", "wsld", "wsld_w1")]  # fmt: skip
    assert all(_distill(sp) == PRE_REGISTERED_DISTILL[sp.row] for sp in phase2)
    assert plan.comparisons(s.rows) == (("wsld", "ce"), ("wsld", "kd"), ("wsld", "wsld_w1"))


def test_dkd_and_dist_rows_have_their_published_values_and_a_search_of_the_same_size(tmp_path, monkeypatch):
    s = Settings(rows=("ce", "wsld", "dkd", "dist"))
    phase1, phase2 = _plan(tmp_path, monkeypatch, s)
    search = {k: [sp for sp in phase1 if sp.regime == "search" and sp.row == k] for k in s.rows}
    assert all(len(runs) == 4 for runs in search.values())
    assert [sp.grid for sp in search["dkd"]] == [(0.05, 4.0), (0.1, 4.0), (0.05, 2.0), (0.1, 2.0)]
    assert [sp.grid for sp in search["dist"]] == [(0.05, 1.0), (0.1, 1.0), (0.05, 4.0), (0.1, 4.0)]
    for sp in [*search["dkd"], *(sp for sp in phase2 if sp.row == "dkd")]:
        loss, _, _, params = _distill(sp)
        assert loss == "dkd"
        assert params["dkd"] == {"alpha": 1.0, "beta": 8.0, "ce_weight": 1.0, "warmup_epochs": pytest.approx(sp.config.train.epochs / 12)}
    warmups = [sp.config.distill.params["dkd"]["warmup_epochs"] for sp in phase2 if sp.row == "dkd" and sp.seed == 0]
    assert warmups == pytest.approx([3 / 12, 6 / 12, 10 / 12])  # balanced, long-tail, small-data: a twelfth of each run
    for sp in [*search["dist"], *(sp for sp in phase2 if sp.row == "dist")]:
        loss, _, _, params = _distill(sp)
        assert loss == "dist"  # no alpha
        assert params["dist"] == {"beta": 1.0, "gamma": 1.0, "weight": 2.0}
    assert plan.comparisons(s.rows) == (("wsld", "ce"), ("wsld", "dkd"), ("wsld", "dist"))
    assert [sp.name for sp in phase2 if sp.regime == "balanced" and sp.seed == 0] == [
        "balanced-ce-s0", "balanced-wsld-s0", "balanced-dkd-s0", "balanced-dist-s0"]


def test_losses_option_keeps_table_order_and_always_runs_ce_and_wsld():
    parser = build_parser()
    assert settings_from_args(parser.parse_args(["demo"])).rows == ("ce", "kd", "wsld", "wsld_w1")
    assert settings_from_args(parser.parse_args(["demo", "--losses", "dist", "dkd"])).rows == ("ce", "wsld", "dkd", "dist")
    assert settings_from_args(parser.parse_args(["demo", "--losses", "wsld_w1", "ce"])).rows == ("ce", "wsld", "wsld_w1")
    with pytest.raises(SystemExit) as e:
        parser.parse_args(["demo", "--losses", "crd"])
    assert e.value.code == 2


def test_tiny_demo_with_dkd_and_dist_reports_their_rows_and_differences(tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["demo", "--out", str(out), "--limit-per-class", "20", "--teacher-epochs", "1", "--seeds", "1", "--batch-size",
            "16", "--epochs", "1", "--jobs", "1", "--threads", "1", "--no-progress", "--regimes", "small-data",
            "--losses", "ce", "wsld", "dkd", "dist"]  # fmt: skip
    assert main(argv) == 0
    printed = capsys.readouterr().out
    res = json.loads((out / "results.json").read_text(encoding="utf-8"))
    assert res["rows"] == res["settings"]["rows"] == ["ce", "wsld", "dkd", "dist"]
    assert "--losses ce wsld dkd dist" in res["command"]
    v = res["regimes"]["small-data"]
    assert list(v["rows"]) == ["ce", "wsld", "dkd", "dist"] and list(res["search"]["chosen"]) == list(v["rows"])
    assert list(v["differences"]) == ["wsld-ce", "wsld-dkd", "wsld-dist"]
    for key in ("dkd", "dist"):
        d = v["differences"][f"wsld-{key}"]
        assert d["per_seed"] == [v["rows"]["wsld"]["seeds"][0]["top1"] - v["rows"][key]["seeds"][0]["top1"]]
    assert (v["rows"]["dkd"]["alpha"], v["rows"]["dkd"]["params"]["beta"], v["rows"]["dist"]["params"]["weight"]) == (1.0, 8.0, 2.0)
    report = (out / "report.md").read_text(encoding="utf-8")
    assert report.startswith("# wsld demo: teacher / student alone / WSLD / DKD / DIST, on Fashion-MNIST")
    assert "| WSLD − DKD |" in report and "| WSLD − DIST |" in report and "WSLD − KD" not in report
    for text in (report, printed):
        assert "| DKD (alpha 1, beta 8) |" in text and "| DIST (beta 1, gamma 1, weight 2) |" in text
        for name in ("DKD", "DIST"):
            assert f"ahead of {name} by" in text or f"behind {name} by" in text or f"WSLD and {name} are level" in text
    search = report[report.index("## Search") :]
    for name, grid in (("DKD (alpha 1, beta 8)", "4 4 2 2"), ("DIST (beta 1, gamma 1, weight 2)", "1 1 4 4")):
        line = next(ln for ln in search.splitlines() if ln.startswith(f"| {name} | "))
        assert " ".join(re.findall(r"lr 0\.(?:05|1), T (\d+): ", line)) == grid  # the search table, in grid order
    assert "DKD: `CE + min(epoch / warm-up, 1)" in report and "DIST's T is its tau" in report
    dkd = load_config(out / "configs" / "small-data-dkd-s0.yaml")  # a user can rerun it by hand
    assert (dkd.distill.loss, dkd.distill.params["dkd"]["warmup_epochs"]) == ("dkd", pytest.approx(1 / 12))
    for run, parts in (("small-data-dkd-s0", ("tckd", "nckd")), ("small-data-dist-s0", ("inter", "intra"))):
        recs = [json.loads(line) for line in (out / "runs" / run / "metrics.jsonl").read_text().splitlines()]
        assert [r for r in recs if r["kind"] == "train" and all(p in r for p in parts)]  # the loss itself ran
    assert (out / "plots" / "final_top1.png").read_bytes()[:4] == b"\x89PNG"
