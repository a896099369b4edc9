"""``wsld demo`` end to end on a tiny slice of Fashion-MNIST: export, list, pack, the teacher and
the three losses for both variants through ``wsld train``, then report, results.json and plots."""

from __future__ import annotations

import json
import pytest
import torch

from wsld.cli import main
from wsld.config import load_config
from wsld.data.transforms import TrainTransform

PER_CLASS = 20
SLICE = ["--limit-per-class", str(PER_CLASS), "--teacher-epochs", "1", "--tune-epochs", "1", "--seeds", "1",
         "--batch-size", "16"]
TINY = [*SLICE, "--epochs", "1", "--jobs", "1", "--threads", "1", "--no-progress"]


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """One tiny demo run shared by the tests (both variants: 2 teachers, 9 learning-rate search runs,
    6 student runs, 1 epoch each)."""
    out = tmp_path_factory.mktemp("demo") / "out"
    assert main(["demo", "--out", str(out), *TINY]) == 0
    return out


def _results(out):
    return json.loads((out / "results.json").read_text(encoding="utf-8"))


def test_report_results_and_plots_hold_the_runs_numbers(demo):
    res = _results(demo)
    assert set(res["variants"]) == {"balanced", "long-tail"}
    report = (demo / "report.md").read_text(encoding="utf-8")
    for variant, v in res["variants"].items():
        teacher_summary = json.loads((demo / "runs" / f"{variant}-teacher" / "summary.json").read_text())
        assert v["teacher"]["top1"] == teacher_summary["last_top1"]
        for loss in ("ce", "kd", "wsld"):
            entry = v["losses"][loss]
            (seed,) = entry["seeds"]
            summary = json.loads((demo / "runs" / f"{variant}-{loss}-s0" / "summary.json").read_text())
            assert seed["top1"] == summary["last_top1"] == entry["top1_mean"]
            assert entry["top1_std"] is None  # one seed: no spread to report
            assert len(seed["curve"]) == 1 and seed["curve"][0] == summary["last_top1"]
            assert f"| {entry['row']} | {summary['last_top1']:.2f} |" in report
            if loss != "ce":  # the KD/WSLD runs loaded the teacher run's weights
                assert summary["teacher_top1"] == pytest.approx(teacher_summary["last_top1"])
        weights = v["losses"]["wsld"]["class_weights_mean"]
        assert len(weights) == 1 and len(weights[0]) == 10
        assert all(0.0 <= w < 1.0 for w in weights[0])
        assert "class_weights_mean" not in v["losses"]["kd"]
    assert "paired by seed" in report and "Long-tailed" in report
    for name in ("curves_balanced", "curves_long-tail", "final_top1", "wsld_weights_balanced",
                 "wsld_weights_long-tail", "long_tail_per_class"):
        png = demo / "plots" / f"{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"(plots/{name}.png)" in report
        import matplotlib.image

        assert matplotlib.image.imread(png).shape[0] > 200


def test_data_went_through_folder_list_and_lmdb(demo):
    root = demo / "data" / f"fashion-mnist-{PER_CLASS}-{PER_CLASS}"
    classes = (root / "classes.txt").read_text().split()
    assert classes[0] == "0_T-shirt_top" and classes[9] == "9_Ankle_boot" and classes == sorted(classes)
    assert len(list((root / "train" / "3_Dress").glob("*.png"))) == PER_CLASS
    for split in ("train", "val"):
        assert (root / "lmdb" / split / "data.mdb").is_file()
    cfg = load_config(demo / "configs" / "balanced-wsld-s0.yaml")  # a user can rerun it by hand
    assert (cfg.data.format, cfg.distill.loss, cfg.distill.T, cfg.distill.alpha) == ("lmdb", "wsld", 4.0, 2.25)
    assert cfg.model.teacher_weights == str((demo / "runs" / "balanced-teacher" / "last.pt").resolve())
    kd = load_config(demo / "configs" / "balanced-kd-s0.yaml")
    assert (kd.distill.T, kd.distill.alpha) == (4.0, 0.9)
    ce = load_config(demo / "configs" / "balanced-ce-s0.yaml")
    for key in ("epochs", "lr", "schedule", "weight_decay", "seed"):  # one recipe for every loss
        assert getattr(ce.train, key) == getattr(cfg.train, key) == getattr(kd.train, key)
    assert ce.data == cfg.data == kd.data


def test_long_tail_split_has_the_cifar_lt_class_counts(demo):
    v = _results(demo)["variants"]["long-tail"]
    expected = [max(1, int(PER_CLASS * 100 ** (-k / 9))) for k in range(10)]
    assert v["class_counts"] == expected
    assert v["class_counts"][0] == PER_CLASS and v["class_counts"][-1] == 1
    assert v["groups"] == {"head": [0, 1, 2], "middle": [3, 4, 5, 6], "tail": [7, 8, 9]}
    cfg = load_config(demo / "configs" / "long-tail-teacher.yaml")
    assert cfg.data.long_tail_ratio == 100 and cfg.model.student == "cnn_teacher"
    assert _results(demo)["variants"]["balanced"]["class_counts"] == [PER_CLASS] * 10
    e = v["losses"]["wsld"]
    groups = e["seeds"][0]["group_top1"]
    pc = e["seeds"][0]["per_class_top1"]
    assert groups["tail"] == pytest.approx(sum(pc[7:]) / 3)


def test_rerun_reuses_finished_runs_and_resumes_an_unfinished_one(demo, capsys):
    before = _results(demo)
    # make one run unfinished: it keeps its checkpoint, loses its summary
    (demo / "runs" / "long-tail-kd-s0" / "summary.json").unlink()
    capsys.readouterr()
    assert main(["demo", "--out", str(demo), *SLICE, "--epochs", "1", "--jobs", "2", "--threads", "1", "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "reusing 11 finished run(s)" in err and "reusing 5 finished run(s)" in err
    assert "finished long-tail-kd-s0" in err
    log = (demo / "logs" / "long-tail-kd-s0.log").read_text()
    assert "--resume" in log  # a wsld train process resumed it from its checkpoint
    after = _results(demo)
    for variant in ("balanced", "long-tail"):
        for loss in ("ce", "kd", "wsld"):
            assert after["variants"][variant]["losses"][loss]["top1_mean"] == before["variants"][variant]["losses"][loss]["top1_mean"]


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


def test_padded_crop_is_random_crop_of_the_zero_padded_image():
    """``data.train_crop=padded`` (used by the demo): torchvision's RandomCrop(size, padding) + flip,
    drawing top, left, flip from the per-sample generator."""
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


def test_same_command_gives_the_same_numbers(demo, tmp_path, capsys):
    """Everything is seeded: a second demo in a fresh folder trains the same models."""
    capsys.readouterr()
    assert main(["demo", "--out", str(tmp_path / "again"), *TINY, "--variants", "balanced"]) == 0
    table = capsys.readouterr().out
    first, again = _results(demo)["variants"]["balanced"], _results(tmp_path / "again")["variants"]["balanced"]
    assert again["teacher"]["per_class_top1"] == first["teacher"]["per_class_top1"]
    for loss in ("ce", "kd", "wsld"):
        assert again["losses"][loss]["seeds"][0]["per_class_top1"] == first["losses"][loss]["seeds"][0]["per_class_top1"]
        assert again["losses"][loss]["seeds"][0]["curve"] == first["losses"][loss]["seeds"][0]["curve"]
    assert again["losses"]["wsld"]["class_weights_mean"] == first["losses"]["wsld"]["class_weights_mean"]
    from wsld.checkpoint import load_checkpoint

    for run in ("balanced-teacher", "balanced-wsld-s0"):  # bit-identical weights, not just equal accuracy
        a = load_checkpoint(demo / "runs" / run / "last.pt")["student"]
        b = load_checkpoint(tmp_path / "again" / "runs" / run / "last.pt")["student"]
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert "| Teacher |" in table and "WSLD − KD" in table


def test_learning_rate_is_searched_alike_for_every_loss_on_held_out_training_images(demo):
    from wsld.demo.plan import STUDENT_LRS

    res = _results(demo)
    chosen = res["tuning"]["chosen"]
    assert set(chosen) == {"ce", "kd", "wsld"}
    for loss, v in chosen.items():
        assert set(v["heldout_top1"]) == {f"{lr:g}" for lr in STUDENT_LRS}
        for lr in STUDENT_LRS:
            summary = json.loads((demo / "runs" / f"tune-{loss}-lr{lr:g}" / "summary.json").read_text())
            assert v["heldout_top1"][f"{lr:g}"] == summary["last_top1"]
        assert v["heldout_top1"][f"{v['lr']:g}"] == max(v["heldout_top1"].values())
        for variant in ("balanced", "long-tail"):  # every seed and variant trains with the chosen rate
            assert load_config(demo / "configs" / f"{variant}-{loss}-s0.yaml").train.lr == v["lr"]
    tune = demo / "data" / f"fashion-mnist-tune-{PER_CLASS // 2}"
    train = {p.name for p in (tune / "train").rglob("*.png")}
    heldout = {p.name for p in (tune / "val").rglob("*.png")}
    assert len(train) == len(heldout) == 10 * (PER_CLASS // 2) and not train & heldout
    main_train = {p.name for p in (demo / "data" / f"fashion-mnist-{PER_CLASS}-{PER_CLASS}" / "train").rglob("*.png")}
    assert heldout <= main_train  # held-out images are training images (indices into the training file)
    assert "## Learning rate" in (demo / "report.md").read_text()
    cfg = load_config(demo / "configs" / "tune-wsld-lr0.025.yaml")
    assert cfg.data.data_path == str((tune / "lmdb").resolve()) and cfg.train.seed == 0
