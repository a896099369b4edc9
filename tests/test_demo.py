"""``wsld demo`` end to end on a tiny slice of Fashion-MNIST: the three regimes' teachers, the soft-label
stores, the search and the four rows through ``wsld train`` / ``wsld soft-labels``, then report,
results.json and plots; rerun, refusal of other settings, determinism."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from wsld.cli import main
from wsld.config import load_config
from wsld.data.transforms import TrainTransform
from wsld.demo.plan import STUDENT, TEACHER, Settings

PER_CLASS = 20  # small-data / search: 2 per class, held-out 5 per class
SLICE = ["--limit-per-class", str(PER_CLASS), "--teacher-epochs", "1", "--seeds", "1", "--batch-size", "16"]
TINY = [*SLICE, "--epochs", "1", "--jobs", "1", "--threads", "1", "--no-progress"]
ROWS = Settings().chosen_rows  # the default rows (no --losses)
ROW_KEYS = [r.key for r in ROWS]


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """One tiny demo shared by the tests: 3 teachers, 3 stores, 16 search runs, 12 student runs, 1 epoch each."""
    out = tmp_path_factory.mktemp("demo") / "out"
    assert main(["demo", "--out", str(out), *TINY]) == 0
    return out


def _results(out):
    return json.loads((out / "results.json").read_text(encoding="utf-8"))


def _summary(out, run):
    return json.loads((out / "runs" / run / "summary.json").read_text(encoding="utf-8"))


def test_report_results_and_plots_hold_the_runs_numbers(demo):
    res = _results(demo)
    assert list(res["regimes"]) == ["balanced", "long-tail", "small-data"]
    report = (demo / "report.md").read_text(encoding="utf-8")
    assert f"`{TEACHER}` (272,186 parameters), student `{STUDENT}` (77,754 parameters, 3.5x fewer)" in report
    for regime, v in res["regimes"].items():
        assert v["teacher"]["top1"] == _summary(demo, f"{regime}-teacher")["last_top1"]
        assert list(v["rows"]) == ROW_KEYS
        for key, entry in v["rows"].items():
            (seed,) = entry["seeds"]
            summary = _summary(demo, f"{regime}-{key}-s0")
            assert seed["top1"] == summary["last_top1"] == entry["top1_mean"]
            assert entry["top1_std"] is None  # one seed: no spread to report
            assert len(seed["curve"]) == 1 and seed["curve"][0] == summary["last_top1"]
            assert f"| {entry['name']} |" in report and f"| {summary['last_top1']:.2f} |" in report
        d = v["differences"]["wsld-kd"]
        assert d["per_seed"] == [v["rows"]["wsld"]["seeds"][0]["top1"] - v["rows"]["kd"]["seeds"][0]["top1"]]
        assert d["low"] is None  # one seed: no interval
        assert set(v["differences"]) == {"wsld-ce", "wsld-kd", "wsld-wsld_w1"}
        weights = v["rows"]["wsld"]["class_weights_mean"]
        assert len(weights) == 1 and len(weights[0]) == 10 and all(0.0 <= w < 1.0 for w in weights[0])
    assert "WSLD is" in report and "no confidence interval from a single seed" in report
    readme = (demo / "readme_table.md").read_text(encoding="utf-8")  # for the README's results section
    assert "| Teacher |" in readme and "long-tailed, tail classes" in readme and "- Small data" in readme
    for name in ("curves_balanced", "curves_long-tail", "curves_small-data", "final_top1", "wsld_weights_balanced",
                 "long_tail_per_class"):  # fmt: skip
        png = demo / "plots" / f"{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"(plots/{name}.png)" in report


def test_rows_are_the_registered_recipe_and_distil_from_stores(demo):
    res = _results(demo)
    chosen = res["search"]["chosen"]
    for regime in ("balanced", "long-tail", "small-data"):
        ce = load_config(demo / "configs" / f"{regime}-ce-s0.yaml")  # a user can rerun it by hand
        assert (ce.model.student, ce.distill.loss, ce.data.format) == (STUDENT, "ce", "builtin")
        for key in ("kd", "wsld", "wsld_w1"):
            cfg = load_config(demo / "configs" / f"{regime}-{key}-s0.yaml")
            assert cfg.model.student == STUDENT and cfg.model.teacher == TEACHER
            assert cfg.distill.soft_labels == str((demo / "stores" / f"{regime}-store-s0").resolve())
            assert (cfg.train.lr, cfg.distill.T) == (chosen[key]["lr"], chosen[key]["T"])
            for k in ("epochs", "schedule", "weight_decay", "seed", "momentum"):
                assert getattr(cfg.train, k) == getattr(ce.train, k)  # one recipe for every row
            assert cfg.data == ce.data
        kd, wsld, w1 = (load_config(demo / "configs" / f"{regime}-{k}-s0.yaml") for k in ("kd", "wsld", "wsld_w1"))
        assert (kd.distill.loss, kd.distill.params["kd"]) == ("kd", {"alpha": 0.9})
        assert (wsld.distill.loss, wsld.distill.params["wsld"]) == ("wsld", {"alpha": 2.5, "weighting": "on"})
        assert (w1.distill.loss, w1.distill.params["wsld"]) == ("wsld", {"alpha": 2.5, "weighting": "off"})
        teacher = load_config(demo / "configs" / f"{regime}-teacher.yaml")
        assert teacher.model.student == TEACHER and teacher.train.lr == 0.1
    log = (demo / "logs" / "balanced-wsld-s0.log").read_text()
    assert "no teacher model" in log  # the distilled run read the store, it ran no teacher
    assert "--topk 10 --precision float32" in (demo / "logs" / "balanced-store-s0.log").read_text()


def test_long_tail_and_small_data_splits(demo):
    res = _results(demo)["regimes"]
    v = res["long-tail"]
    expected = [max(1, int(PER_CLASS * 100 ** (-k / 9))) for k in range(10)]
    assert v["class_counts"] == expected and v["class_counts"][0] == PER_CLASS and v["class_counts"][-1] == 1
    assert v["groups"] == {"head": [0, 1, 2], "middle": [3, 4, 5, 6], "tail": [7, 8, 9]}
    seed = v["rows"]["wsld"]["seeds"][0]
    assert seed["group_top1"]["tail"] == pytest.approx(sum(seed["per_class_top1"][7:]) / 3)
    assert load_config(demo / "configs" / "long-tail-teacher.yaml").data.long_tail_ratio == 100
    assert res["balanced"]["class_counts"] == [PER_CLASS] * 10
    assert res["small-data"]["class_counts"] == [2] * 10  # the limit's tenth
    assert res["small-data"]["val_images"] == res["balanced"]["val_images"] == 10 * PER_CLASS


def test_search_is_alike_for_every_row_and_scored_on_held_out_training_images(demo):
    from wsld.data.builtin import load_fashion_mnist

    res = _results(demo)
    chosen = res["search"]["chosen"]
    assert list(chosen) == ROW_KEYS
    for row in ROWS:
        c = chosen[row.key]
        assert len(c["table"]) == 4  # the same budget for every row
        assert [(e["lr"], e["T"]) for e in c["table"]] == list(row.grid)
        for e in c["table"]:
            assert e["heldout_top1"] == _summary(demo, e["run"])["last_top1"]
        assert max(e["heldout_top1"] for e in c["table"]) == next(
            e["heldout_top1"] for e in c["table"] if (e["lr"], e["T"]) == (c["lr"], c["T"]))
        if row.distilled:
            assert {e["T"] for e in c["table"]} == {2.0, 4.0}
    search = res["data"]["search"]
    train_x, train_y = load_fashion_mnist("train", search)
    held_x, held_y = load_fashion_mnist("val", search)  # the search's "val": training images
    full_x, full_y = load_fashion_mnist("train", None)
    assert len(train_y) == 20 and len(held_y) == 50 and sorted(set(held_y)) == list(range(10))
    full = {bytes(full_x[i].numpy()) for i in range(2000)}
    held = {bytes(x.numpy()) for x in held_x}
    assert held <= full and not held & {bytes(x.numpy()) for x in train_x}  # training images, never trained on
    cfg = load_config(demo / "configs" / "search-wsld-lr0.05-T2.yaml")
    assert cfg.data.data_path == search and cfg.train.seed == 0
    assert cfg.distill.soft_labels == str((demo / "stores" / "small-data-store-s0").resolve())
    small = load_config(demo / "configs" / "small-data-wsld-s0.yaml")
    assert cfg.train.epochs == small.train.epochs  # search runs are the small-data runs, scored elsewhere
    assert np.array_equal(load_fashion_mnist("train", small.data.data_path)[0].numpy(), train_x.numpy())
    assert "## Search" in (demo / "report.md").read_text()


def test_rerun_reuses_finished_runs_and_resumes_an_unfinished_one(demo, capsys):
    before = _results(demo)
    (demo / "runs" / "long-tail-kd-s0" / "summary.json").unlink()  # unfinished: keeps its checkpoint
    capsys.readouterr()
    assert main(["demo", "--out", str(demo), *SLICE, "--epochs", "1", "--jobs", "2", "--threads", "1", "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "reusing 22 finished run(s)" in err and "reusing 11 finished run(s)" in err
    assert "finished long-tail-kd-s0" in err
    assert "--resume" in (demo / "logs" / "long-tail-kd-s0.log").read_text()  # a wsld train process resumed it
    after = _results(demo)
    for regime in before["regimes"]:
        for key in ROW_KEYS:
            assert after["regimes"][regime]["rows"][key]["top1_mean"] == before["regimes"][regime]["rows"][key]["top1_mean"]


def test_other_settings_on_the_same_out_are_refused(demo, capsys):
    configs = {p.name: p.read_text() for p in (demo / "configs").iterdir()}
    assert main(["demo", "--out", str(demo), *SLICE, "--epochs", "2", "--jobs", "1", "--no-progress"]) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("wsld: error:")]
    assert len(errors) == 1 and "train.epochs" in errors[0] and "another --out" in errors[0]
    assert "Traceback" not in err
    assert {p.name: p.read_text() for p in (demo / "configs").iterdir()} == configs  # nothing rewritten


def test_bad_arguments_give_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["demo", "--seeds", "many"])
    assert e.value.code == 2
    capsys.readouterr()
    assert main(["demo", "--out", str(tmp_path / "x"), "--seeds", "0"]) == 2
    assert "--seeds must be >= 1" in capsys.readouterr().err
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert main(["demo", "--out", str(blocker / "sub"), *TINY]) == 2
    assert "cannot create the demo folder" in capsys.readouterr().err


def test_same_command_gives_the_same_numbers(demo, tmp_path, capsys):
    """Everything is seeded: a second demo in a fresh folder trains the same models."""
    capsys.readouterr()
    assert main(["demo", "--out", str(tmp_path / "again"), *TINY, "--regimes", "small-data"]) == 0
    table = capsys.readouterr().out
    first, again = _results(demo)["regimes"]["small-data"], _results(tmp_path / "again")["regimes"]["small-data"]
    assert again["teacher"]["per_class_top1"] == first["teacher"]["per_class_top1"]
    for key in ROW_KEYS:
        assert again["rows"][key]["seeds"][0]["per_class_top1"] == first["rows"][key]["seeds"][0]["per_class_top1"]
        assert again["rows"][key]["seeds"][0]["curve"] == first["rows"][key]["seeds"][0]["curve"]
    from wsld.checkpoint import load_checkpoint

    for run in ("small-data-teacher", "small-data-wsld-s0"):  # bit-identical weights, not just equal accuracy
        a = load_checkpoint(demo / "runs" / run / "last.pt")["student"]
        b = load_checkpoint(tmp_path / "again" / "runs" / run / "last.pt")["student"]
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert "| Teacher |" in table and "no confidence interval from a single seed" in table


def test_padded_crop_is_random_crop_of_the_zero_padded_image():
    """``data.train_crop=padded``: torchvision's RandomCrop(size, padding) + flip, drawing top, left,
    flip from the per-sample generator."""
    import io

    from PIL import Image

    from wsld.data.images import EncodedImage

    pixels = torch.randint(0, 256, (28, 28), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    buf = io.BytesIO()
    Image.fromarray(pixels.numpy()).save(buf, format="PNG")
    tf = TrainTransform(28, hflip=True, crop="padded", padding=2)
    for seed in range(6):
        out = tf(EncodedImage(buf.getvalue()), seed)
        g = torch.Generator().manual_seed(seed)
        top, left = (int(torch.randint(0, 5, (1,), generator=g)) for _ in range(2))
        ref = torch.nn.functional.pad(pixels.expand(3, 28, 28), (2, 2, 2, 2))[:, top : top + 28, left : left + 28]
        if torch.rand(1, generator=g).item() < 0.5:
            ref = ref.flip(-1)
        assert torch.equal(out, ref)
