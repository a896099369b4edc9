"""``wsld compare`` end to end on real data through the CLI: a shipped config (digits) and an own photo folder; the
teacher's and every row's search on held-out training images, the final seeds, every paired difference, the report
in words, flags for unbracketed values, rerun and refusal of other settings."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from data_fixtures import error_line, photo, wsld
from wsld.cli import main

REPO = Path(__file__).resolve().parents[1]
TINY = ["--seeds", "2", "--epochs", "1", "--teacher-epochs", "1", "--search-limit", "0", "--jobs", "1", "--threads", "1",
        "--no-progress"]  # fmt: skip


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    """One comparison shared by the tests: teacher search, CE / KD / WSLD searches, 2 seeds, 1 epoch each."""
    out = tmp_path_factory.mktemp("compare") / "digits"
    argv = ["compare", str(REPO / "configs" / "digits_wsld.yaml"), "--losses", "ce", "kd", "wsld", "--out", str(out), *TINY]
    assert main(argv) == 0
    return out, argv


def _json(path: Path):
    return json.loads(path.read_text(encoding="utf-8"))


def _summary(out: Path, run: str) -> dict:
    return _json(out / "runs" / run / "summary.json")


def _config(out: Path, run: str) -> dict:
    return yaml.safe_load((out / "configs" / f"{run}.yaml").read_text(encoding="utf-8"))


def test_rows_every_pair_and_the_verdicts_come_from_the_runs(digits):
    out, _ = digits
    res = _json(out / "results.json")
    report = (out / "report.md").read_text(encoding="utf-8")
    assert res["rows_order"] == ["ce", "kd", "wsld"]
    for key, row in res["rows"].items():
        assert [r["top1"] for r in row["seeds"]] == [_summary(out, f"{key}-s{s}")["last_top1"] for s in (0, 1)]
        assert f"| {row['name']} |" in report
    assert set(res["differences"]) == {"kd-ce", "wsld-ce", "wsld-kd"}  # every pair, not only those with WSLD
    for d in res["differences"].values():
        a, b = res["rows"][d["a"]]["seeds"], res["rows"][d["b"]]["seeds"]
        assert d["per_seed"] == [x["top1"] - y["top1"] for x, y in zip(a, b)]
        assert d["low"] is not None and d["low"] <= d["mean"] <= d["high"]  # 2 seeds: a t-interval
    for key, v in res["verdicts"].items():  # every pair lands in exactly one of wins / ties / loses for each side
        assert sorted(v["wins"] + v["ties"] + v["loses"]) == sorted(k for k in res["rows"] if k != key)
    assert res["headline"] in report and "Where each loss wins, ties and loses" in report
    assert res["headline"].startswith(("Distillation helps here", "Distillation does not help here"))
    assert res["teacher"]["top1"] == _summary(out, "teacher")["last_top1"]
    assert {p.name for p in (out / "plots").iterdir()} == {"final_top1.png", "paired_differences.png", "search_lr.png",
                                                           "curves.png"}  # fmt: skip


def test_every_choice_is_made_on_held_out_training_images(digits):
    out, _ = digits
    res = _json(out / "results.json")
    data = res["data"]
    assert data["search_train_images"] + data["heldout_images"] == data["train_images"] == 1347
    assert data["heldout_images"] == 136  # 10% of each class's 1,347 digits
    for key, srch in res["search"].items():
        for r in srch["runs"]:
            cfg = _config(out, r["run"])
            assert cfg["data"]["holdout"] == 0.1 and cfg["train"]["seed"] == 0
            assert r["heldout_top1"] == _summary(out, r["run"])["last_top1"]
        best = max(r["heldout_top1"] for r in srch["runs"])
        assert any(r["values"] == srch["chosen"] and r["heldout_top1"] == best for r in srch["runs"])
    for key in res["rows"]:
        assert _config(out, f"{key}-s1")["data"]["holdout"] == 0.0  # final runs: all training images, the test split
        assert res["rows"][key]["values"] == res["search"][key]["chosen"]
    assert _config(out, "teacher")["train"]["lr"] == res["search"]["teacher"]["chosen"]["lr"] == res["teacher"]["lr"]
    assert _config(out, "kd-s0")["model"]["teacher_weights"] == str((out / "runs" / "teacher" / "last.pt").resolve())
    search_teacher = _config(out, "store-search")["model"]["teacher_weights"]
    assert search_teacher.startswith(str((out / "runs" / "search-teacher-").resolve()))  # never saw the held-out images


def test_same_search_budget_per_row_and_edges_flagged_with_a_low_limit(digits):
    out, _ = digits
    res = _json(out / "results.json")
    report = (out / "report.md").read_text(encoding="utf-8")
    counts = {k: res["search"][k]["count"] for k in res["rows"]}
    assert len(set(counts.values())) == 1 and res["search_budget"]["equal"]  # CE filled to the distilled rows' 7
    assert counts["kd"] == 7 and f"Every row had the same search budget: {counts['kd']} runs." in report
    flagged = []
    for key, srch in res["search"].items():
        for dim in srch["dims"]:
            assert len(dim["grid"]) == 3  # --search-limit 0: never extended
            at_edge = dim["best"] in (dim["grid"][0], dim["grid"][-1])
            assert (dim["edge"] is not None) == at_edge and (dim["why"] == "limit") == at_edge
            if at_edge:
                flagged.append(key)
                assert f"{dim['name']} at the {dim['edge']} edge" in report
    assert ("**Not bracketed**" in report) == bool(flagged)


def test_rerun_reuses_everything_and_other_settings_are_refused_before_writing(digits, capsys):
    out, argv = digits
    before = _json(out / "results.json")
    stamp = sorted((str(p), p.stat().st_mtime_ns) for p in (out / "runs").rglob("*"))
    rc, _, err = wsld(capsys, *argv)
    assert rc == 0 and "finished " not in err  # nothing trained again
    assert sorted((str(p), p.stat().st_mtime_ns) for p in (out / "runs").rglob("*")) == stamp
    assert _json(out / "results.json")["rows"] == before["rows"]
    listing = sorted((str(p), p.stat().st_mtime_ns) for p in out.rglob("*"))
    rc, _, err = wsld(capsys, *[a if a != "2" else "3" for a in argv])  # --seeds 3
    line = error_line(err)
    assert rc == 2 and "other settings (seeds)" in line and f"rm -rf {out}" in line and "--out" in line
    assert sorted((str(p), p.stat().st_mtime_ns) for p in out.rglob("*")) == listing


def _photo_folder(root: Path, classes=("cat", "dog", "fox"), train=6, val=2) -> Path:
    for c, cls in enumerate(classes):
        for split, n in (("train", train), ("val", val)):
            (root / split / cls).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                photo(100 * c + 10 * (split == "val") + i, 48, 40).save(root / split / cls / f"{i}.jpg", quality=90)
    return root


def test_own_photo_folder_end_to_end(tmp_path, capsys):
    root = _photo_folder(tmp_path / "photos")
    cfg = tmp_path / "mine.yaml"
    cfg.write_text(yaml.safe_dump({
        "data": {"dataset": "mine", "format": "folder", "data_path": str(root), "image_size": 24, "val_resize": 28,
                 "batch_size": 6, "workers": 0},
        "model": {"teacher": "cnn_teacher", "student": "cnn_student", "teacher_cache": str(tmp_path / "cache")},
        "distill": {"loss": "kd"}, "train": {"epochs": 1, "lr": 0.1, "base_batch_size": 6},
        "teacher_train": {"epochs": 1, "lr": 0.1},
    }), encoding="utf-8")  # fmt: skip
    out = tmp_path / "cmp"
    rc, stdout, err = wsld(capsys, "compare", cfg, "--losses", "ce", "kd", "--out", out, "--holdout", "0.2", *TINY)
    assert rc == 0, err
    assert "estimated time:" in err.split("finished")[0]  # said before the first run
    res = _json(out / "results.json")
    assert res["data"] == {"classes": 3, "train_images": 18, "search_train_images": 15, "heldout_images": 3,
                           "test_images": 6, "holdout": 0.2}  # fmt: skip
    assert set(res["differences"]) == {"kd-ce"} and res["search"]["kd"]["count"] == res["search"]["ce"]["count"] == 7
    assert res["headline"] in stdout and (out / "report.md").is_file()


@pytest.mark.parametrize("fmt", ["folder", "list", "lmdb"])
def test_holdout_never_reads_the_val_split(tmp_path, fmt):
    from wsld.config import load_config
    from wsld.data.build import build_datasets

    root = _photo_folder(tmp_path / "p", train=5, val=0)
    for d in (root / "val").iterdir():
        d.rmdir()
    (root / "val").rmdir()  # no val split at all
    data_path = root
    if fmt == "list":
        assert main(["data", "list", str(root)]) == 0
    elif fmt == "lmdb":
        assert main(["data", "pack", str(root), "--split", "train", "--workers", "1", "--no-progress"]) == 0
        data_path = root / "lmdb"
    cfg = load_config(None, [f"data.format={fmt}", f"data.data_path={data_path}", "data.holdout=0.2", "data.dataset=mine"])
    train, val, info = build_datasets(cfg.data)
    assert (len(train), len(val), info.num_classes) == (12, 3, 3)
    assert sorted(val.targets) == [0, 1, 2]  # one held-out image per class
    assert not set(train.indices) & set(val.indices)
    assert val[0][0].shape == train[(0, 0)][0].shape  # the val transforms: the same size, no augmentation draw


def test_bad_options_are_one_line_errors(tmp_path, capsys):
    for args, words in ((["--holdout", "1.5"], "--holdout must be in (0, 1)"), (["--seeds", "0"], "--seeds must be >= 1"),
                        (["--budget", "0"], "--budget must be > 0"), (["--search-limit", "-1"], "--search-limit")):  # fmt: skip
        rc, _, err = wsld(capsys, "compare", REPO / "configs" / "digits_wsld.yaml", "--out", tmp_path / "x", *args)
        assert rc == 2 and words in error_line(err)
        assert not (tmp_path / "x").exists()


def test_no_search_uses_the_configs_and_published_values_and_a_given_teacher(digits, tmp_path, capsys):
    out, _ = digits
    teacher = out / "runs" / "teacher" / "last.pt"
    run = tmp_path / "nosearch"
    rc, stdout, err = wsld(capsys, "compare", REPO / "configs" / "digits_wsld.yaml", f"model.teacher_weights={teacher}",
                           "--losses", "ce", "kd", "--no-search", "--out", run, *TINY)  # fmt: skip
    assert rc == 0, err
    res = _json(run / "results.json")
    assert res["search"] == {} and res["teacher"]["given"] == str(teacher)
    assert res["rows"]["kd"]["values"] == {"lr": 0.025, "T": 4.0, "alpha": 0.9}  # the config's lr and T, KD's published alpha
    assert not list((run / "runs").glob("search-*")) and not (run / "runs" / "teacher").exists()
    assert _config(run, "kd-s0")["data"]["holdout"] == 0.0
    assert "No search (--no-search)" in (run / "report.md").read_text(encoding="utf-8")
