"""The demo's report.md and the table printed at its end."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from wsld.demo.plan import LOSS_NAMES
from wsld.demo.runner import duration


def _fmt(m: float, sd: Optional[float]) -> str:
    return f"{m:.2f} ± {sd:.2f}" if sd is not None else f"{m:.2f}"


def _params(name: str) -> int:
    from wsld.models import build_model

    return sum(p.numel() for p in build_model(name, 10, in_channels=3).parameters())


def results_table(results: dict[str, Any], variant: str) -> list[str]:
    """The reference table's shape: Teacher, Original, KD, WSLD; mean ± std over seeds + per seed."""
    v = results[variant]
    seeds = [r["seed"] for r in v["losses"]["ce"]["seeds"]]
    lines = [
        f"| Network | Method | top-1 (%) | per seed ({', '.join(str(s) for s in seeds)}) |",
        "|---|---|---|---|",
        f"| cnn_teacher ({_params('cnn_teacher') / 1000:.1f}k params) | Teacher | {v['teacher']['top1']:.2f} "
        f"(trained once) | {v['teacher']['top1']:.2f} |",
    ]
    student = f"cnn_student ({_params('cnn_student') / 1000:.1f}k params)"
    for loss, e in v["losses"].items():
        per_seed = ", ".join(f"{r['top1']:.2f}" for r in e["seeds"])
        lines.append(f"| {student} | {e['row']} | {_fmt(e['top1_mean'], e['top1_std'])} | {per_seed} |")
    return lines


def group_table(results: dict[str, Any], variant: str) -> list[str]:
    v = results[variant]
    counts, groups = v["class_counts"], v["groups"]

    def head(g: str) -> str:
        ks = groups[g]
        return f"{g} ({len(ks)} classes, {min(counts[k] for k in ks):,}-{max(counts[k] for k in ks):,} train images)"

    lines = [f"| Method | overall | {' | '.join(head(g) for g in groups)} |", "|---|---|" + "---|" * len(groups)]
    t = v["teacher"]
    lines.append(f"| Teacher | {t['top1']:.2f} | " + " | ".join(f"{t['group_top1'][g]:.2f}" for g in groups) + " |")
    for _loss, e in v["losses"].items():
        cells = [_fmt(e["group_top1"][g]["mean"], e["group_top1"][g]["std"]) for g in groups]
        lines.append(f"| {e['row']} | {_fmt(e['top1_mean'], e['top1_std'])} | " + " | ".join(cells) + " |")
    return lines


def comparison_lines(results: dict[str, Any], variant: str) -> list[str]:
    v = results[variant]
    out = []
    for other in ("ce", "kd"):
        d = v[f"wsld_minus_{other}"]
        n = len(d["per_seed"])
        spread = f" ± {d['std']:.2f}" if d["std"] is not None else ""
        out.append(
            f"WSLD − {LOSS_NAMES[other]}: {d['mean']:+.2f}{spread} points (paired by seed; per seed "
            f"{', '.join(f'{x:+.2f}' for x in d['per_seed'])}): WSLD is ahead on {d['wsld_ahead']} of {n} seed(s)."
        )
    return out


def tuning_lines(meta: dict[str, Any]) -> list[str]:
    """The learning-rate search: procedure and table (held-out top-1 per loss and rate)."""
    t = meta["tuning"]
    lrs = [f"{lr:g}" for lr in t["lrs"]]
    lines = [
        f"Before the comparison, every loss trains the student once per learning rate in {{{', '.join(lrs)}}} "
        f"(per 256 images), seed 0, {t['epochs']} epochs, on the first {t['per_class']:,} training images of each "
        f"class, and is evaluated on the next {t['per_class']:,} training images of each class (held out: never "
        "trained on; the test images are not used). Each loss then uses, for every seed and both variants, the "
        "rate with the best held-out top-1 at the last epoch. The KD/WSLD search runs use the balanced teacher.",
        "",
        "```", *meta["tune_commands"], "```", "",
        f"| loss | {' | '.join(f'lr {lr}' for lr in lrs)} | chosen |",
        "|---|" + "---|" * (len(lrs) + 1),
    ]
    for loss, v in t["chosen"].items():
        cells = [f"**{v['heldout_top1'][lr]:.2f}**" if float(lr) == v["lr"] else f"{v['heldout_top1'][lr]:.2f}" for lr in lrs]
        lines.append(f"| {LOSS_NAMES[loss]} | {' | '.join(cells)} | {v['lr']:g} |")
    return lines


def write_report(out: Path, results: dict[str, Any], meta: dict[str, Any], plots: list[Path]) -> str:
    """``report.md``; returns the short table printed at the end of the demo."""
    from wsld.checkpoint import atomic_write_text

    s = meta["settings"]
    busy = max(meta["machine"]["load_start"], meta["machine"]["load_end"]) > meta["machine"]["cpus"]
    lines = ["# wsld demo: teacher / student alone / KD / WSLD on Fashion-MNIST", ""]
    lines.append(f"Command: `{meta['command']}`" + (" (`--quick`: a pipeline check, not the comparison)" if s["quick"] else ""))
    lines.append("")
    lines.append(
        f"Machine: {meta['machine']['cpus']} CPU cores, {meta['machine']['device']}, torch {meta['machine']['torch']}; "
        f"{s['jobs']} run(s) at a time, {s['threads']} thread(s) each. Training took "
        f"{duration(meta['training_span_s'])} from the first run's start to the last run's end (from the runs' "
        f"metrics.jsonl), {duration(meta['runs_s'])} summed over runs; this invocation of the demo took "
        f"{duration(meta['wall_s'])}. Load average (1 min) at the start / end of this invocation: "
        f"{meta['machine']['load_start']:.1f} / {meta['machine']['load_end']:.1f} on {meta['machine']['cpus']} cores"
        + (" (above the core count: other processes competed for the CPUs)." if busy else ".")
    )
    lines.append("")
    lines.append(
        "Numbers are the **last epoch's** top-1 on the test images (no checkpoint picked on the test set), "
        "mean ± sample standard deviation over seeds; the teacher is trained once per variant (seed 0)."
    )
    for variant, v in results.items():
        n_tr, n_val = v["train_images"], v["val_images"]
        if variant == "balanced":
            lines += ["", f"## Balanced ({n_tr:,} training images, {n_val:,} test images)", ""]
            lines += results_table(results, variant)
        else:
            lines += ["", f"## Long-tailed (imbalance ratio 100: {n_tr:,} training images, balanced {n_val:,} test images)", ""]
            lines.append("Training images per class: " + ", ".join(f"{c} {n:,}" for c, n in zip(v["classes"], v["class_counts"])) + ".")
            lines.append("Head / middle / tail = the first / middle / last third of classes by training count (3 / 4 / 3 classes); "
                         "a group's accuracy is the mean of its classes' accuracies.")
            lines.append("")
            lines += results_table(results, variant)
            lines += [""] + group_table(results, variant)
        lines.append("")
        lines += comparison_lines(results, variant)
    lines += ["", "## Plots", ""]
    for p in plots:
        lines.append(f"![{p.stem}](plots/{p.name})")
        lines.append("")
    r = meta["recipe"]
    lines += [
        "## How the numbers were made", "",
        "Data, as a user prepares ImageNet (the export writes class folders whose sorted order is the label order):", "",
        "```",
        f"# export: {meta['data_root']}/{{train,val}}/<class>/<index>.png (the test images are val)",
        *meta["data_commands"],
        "```", "",
        "Every run is `wsld train CONFIG --out RUN_DIR` with a config written to `configs/` (rerun any row by hand "
        "with the same command). One recipe for every loss; only `distill` differs:", "",
        f"- student `cnn_student`, teacher `cnn_teacher`, 3-channel 28x28 PNGs decoded from the LMDB, "
        f"normalised with Fashion-MNIST's mean/std",
        f"- epochs: {r['epochs']} (teacher: {r['teacher_epochs']}), batch {r['batch_size']}, SGD momentum 0.9 Nesterov, "
        f"lr x batch/256 with the lr per loss chosen below (teacher: 0.1), cosine schedule, weight decay 5e-4, fp32",
        "- augmentation: random 28x28 crop of the image zero-padded by 2 pixels + horizontal flip "
        "(`data.train_crop=padded`); test: the image as it is",
        "- KD: T = 4, alpha = 0.9 (`(1 - alpha) CE + alpha T^2 KL`); WSLD: T = 4, alpha = 2.25 "
        "(`CE + alpha * weighted soft term`), the authors' CIFAR-100 values",
        "- one search, the same for every loss: the learning rate (table below); every other value was fixed "
        "before the runs and is the same for every loss and seed",
        "- the teacher is its own CE run (`<variant>-teacher`), trained once per variant on that variant's training "
        "split; every KD/WSLD run loads its `last.pt` as `model.teacher_weights`",
        "- the teacher's output is computed **online** in every step, on the exact augmented batch the student sees "
        "(teacher in eval mode, BatchNorm running statistics, no gradient)",
        "- seed s fixes the student's initialisation and the data order/augmentation, the same for every loss, so "
        "differences are also given paired by seed",
        "", "## Learning rate: one search per loss, the same for every loss", "",
        *tuning_lines(meta), "", "## Runs", "",
        "| run | config | last top-1 | best top-1 (epoch) | time |", "|---|---|---|---|---|",
    ]  # fmt: skip
    for run in meta["runs"]:
        t = duration(run["seconds"]) if run["seconds"] is not None else "earlier"
        lines.append(f"| {run['name']} | `configs/{run['name']}.yaml` | {run['top1']:.2f} | {run['best_top1']:.2f} "
                     f"({run['best_epoch']}) | {t} |")
    atomic_write_text(out / "report.md", "\n".join(lines) + "\n")

    printed = []
    for variant in results:
        printed += ["", f"Fashion-MNIST, {variant} (test top-1 %, last epoch, mean ± std over seeds)"]
        printed += results_table(results, variant)
        if variant == "long-tail":
            printed += group_table(results, variant)
        printed += comparison_lines(results, variant)
    return "\n".join(printed)


