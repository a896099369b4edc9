"""The demo's report.md and the table printed at its end."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from wsld.demo.plan import ROW_BY_KEY, SHORT_NAMES, STUDENT, TEACHER
from wsld.demo.runner import duration
from wsld.demo.stats import ci_sentence

QUICK_NOTE = ("PIPELINE CHECK (--quick), NOT A COMPARISON: tiny data, 1 seed, 1 epoch; these numbers say nothing "
              "about which loss is better, and no differences are reported")  # fmt: skip
TITLES = {"balanced": "Balanced", "long-tail": "Long-tailed (ratio 100)", "small-data": "Small data (a tenth of the training images)"}
IN_TITLE = {"ce": "student alone", "kd": "KD", "wsld": "WSLD", "wsld_w1": "WSLD with weights fixed at 1", "dkd": "DKD",
            "dist": "DIST"}  # fmt: skip
LOSS_TEXT = {  # each distilled row's loss, for "How the numbers were made"
    "kd": "KD: `(1 - alpha) CE + alpha T^2 KL`, alpha 0.9",
    "wsld": "WSLD: `CE + alpha T^2 mean_i(w_i softCE_i)`, alpha 2.5",
    "wsld_w1": "WSLD with weights fixed at 1: the same with `distill.params={weighting: off}`",
    "dkd": "DKD: `CE + min(epoch / warm-up, 1) (alpha TCKD + beta NCKD) T^2`, alpha 1, beta 8 (the paper's CIFAR-100 "
           "values), warm-up a twelfth of the run's epochs (the paper's 20 of 240)",
    "dist": "DIST: `CE + weight tau^2 (beta inter + gamma intra)` over Pearson correlations, beta = gamma = 1, weight 2 "
            "(the published values), T is its tau",
}  # fmt: skip


def fmt(m: float, sd: Optional[float]) -> str:
    """``91.20 ± 0.31`` (no ± for one value)."""
    return f"{m:.2f} ± {sd:.2f}" if sd is not None else f"{m:.2f}"


def params(name: str) -> int:
    """Parameters of a built-in model for the demo's 1-channel, 10-class data."""
    from wsld.models import build_model

    return sum(p.numel() for p in build_model(name, 10, in_channels=1).parameters())


def _hp(e: dict[str, Any]) -> str:
    return f"lr {e['lr']:g}" + (f", T {e['T']:g}" if e["T"] is not None else "")


def results_table(v: dict[str, Any]) -> list[str]:
    """Teacher and every row: mean ± std over seeds and per seed."""
    seeds = [r["seed"] for r in v["rows"]["ce"]["seeds"]]
    lines = [f"| Network | Method | values | top-1 (%) | per seed ({', '.join(str(s) for s in seeds)}) |",
             "|---|---|---|---|---|",
             f"| {TEACHER} | Teacher | lr 0.1 | {v['teacher']['top1']:.2f} (trained once) | {v['teacher']['top1']:.2f} |"]
    for e in v["rows"].values():
        per_seed = ", ".join(f"{r['top1']:.2f}" for r in e["seeds"])
        lines.append(f"| {STUDENT} | {e['name']} | {_hp(e)} | {fmt(e['top1_mean'], e['top1_std'])} | {per_seed} |")
    return lines


def group_table(v: dict[str, Any]) -> list[str]:
    """Head / middle / tail accuracy of the teacher and every row."""
    counts, groups = v["class_counts"], v["groups"]

    def head(g: str) -> str:
        ks = groups[g]
        return f"{g} ({len(ks)} classes, {min(counts[k] for k in ks):,}-{max(counts[k] for k in ks):,} train images)"

    lines = [f"| Method | overall | {' | '.join(head(g) for g in groups)} |", "|---|---|" + "---|" * len(groups)]
    t = v["teacher"]
    lines.append(f"| Teacher | {t['top1']:.2f} | " + " | ".join(f"{t['group_top1'][g]:.2f}" for g in groups) + " |")
    for e in v["rows"].values():
        cells = [fmt(e["group_top1"][g]["mean"], e["group_top1"][g]["std"]) for g in groups]
        lines.append(f"| {e['name']} | {fmt(e['top1_mean'], e['top1_std'])} | " + " | ".join(cells) + " |")
    return lines


def difference_lines(v: dict[str, Any]) -> list[str]:
    """The paired differences as a table and one plain sentence each."""
    lines = ["| difference (points) | mean | 95% CI (t, over seeds) | per seed |", "|---|---|---|---|"]
    sentences = []
    for d in v["differences"].values():
        a, b = d["a"], d["b"]
        ci = f"[{d['low']:+.2f}, {d['high']:+.2f}]" if d["low"] is not None else "(one seed: none)"
        label = f"{SHORT_NAMES[a]} − {SHORT_NAMES[b]}"
        lines.append(f"| {label} | {d['mean']:+.2f} | {ci} | {', '.join(f'{x:+.2f}' for x in d['per_seed'])} |")
        sentences.append(ci_sentence(SHORT_NAMES[a], SHORT_NAMES[b] if b != "wsld_w1" else "WSLD with weights fixed at 1", d))
    return lines + [""] + sentences


def search_lines(meta: dict[str, Any]) -> list[str]:
    """The search: procedure and table (held-out top-1 per row and grid point)."""
    t = meta["search"]
    lines = [
        f"One search, the same budget for every row ({t['runs_per_row']} runs each): seed 0, {t['epochs']} epochs, "
        f"trained on the small-data split (the first {t['train_per_class']:,} training images of each class) and "
        f"scored on the next {t['heldout_per_class']:,} training images of each class (held out: never trained on; "
        "the test images are not used). CE has no temperature, so its 4 runs are 4 learning rates. Each row then "
        "uses its best point (bold) in every regime and seed. Rates are per 256 images."
        + (" DIST's T is its tau." if "dist" in t["chosen"] else ""),
        "",
        "| row | " + " | ".join(f"run {i + 1}" for i in range(t["runs_per_row"])) + " | chosen |",
        "|---|" + "---|" * (t["runs_per_row"] + 1),
    ]
    for key, c in t["chosen"].items():
        cells = []
        for e in c["table"]:
            text = f"{_hp(e)}: {e['heldout_top1']:.2f}"
            cells.append(f"**{text}**" if (e["lr"], e["T"]) == (c["lr"], c["T"]) else text)
        lines.append(f"| {ROW_BY_KEY[key].name} | {' | '.join(cells)} | {_hp(c)} |")
    return lines


def readme_table(results: dict[str, Any], pt: int, ps: int) -> list[str]:
    """The compact table and sentences for the README: one column per regime (+ long-tail's tail classes)."""
    regimes = list(results)
    heads = []
    for r in regimes:
        heads.append(TITLES[r].lower())
        if r == "long-tail":
            heads.append("long-tailed, tail classes")
    lines = [f"| Network | Method | {' | '.join(heads)} |", "|---|---|" + "---|" * len(heads)]

    def cells(get) -> str:
        out = []
        for r in regimes:
            out.append(get(results[r], None))
            if r == "long-tail":
                out.append(get(results[r], "tail"))
        return " | ".join(out)

    lines.append(f"| {TEACHER} ({pt / 1000:.0f}k params) | Teacher | "
                 + cells(lambda v, g: f"{v['teacher']['top1'] if g is None else v['teacher']['group_top1'][g]:.2f}") + " |")
    for key in next(iter(results.values()))["rows"]:
        e0 = next(iter(results.values()))["rows"][key]
        net = f"{STUDENT} ({ps / 1000:.0f}k params)" if key == "ce" else STUDENT
        lines.append(f"| {net} | {e0['name']}, {_hp(e0)} | " + cells(
            lambda v, g: fmt(v["rows"][key]["top1_mean"], v["rows"][key]["top1_std"]) if g is None
            else fmt(v["rows"][key]["group_top1"][g]["mean"], v["rows"][key]["group_top1"][g]["std"])) + " |")
    lines.append("")
    for r in regimes:
        v = results[r]
        said = [ln for ln in difference_lines(v) if ln and not ln.startswith("|")]
        lines.append(f"- {TITLES[r]}: " + " ".join(said))
    return lines


def write_report(out: Path, results: dict[str, Any], meta: dict[str, Any], plots: list[Path]) -> str:
    """``report.md``; returns the short text printed at the end of the demo."""
    from wsld.files import atomic_write_text

    s = meta["settings"]
    quick = s["quick"]
    m = meta["machine"]
    busy = max(m["load_start"], m["load_end"]) > m["cpus"]
    pt, ps = params(TEACHER), params(STUDENT)
    lines = [f"# wsld demo: teacher / {' / '.join(IN_TITLE[k] for k in meta['rows'])}, on Fashion-MNIST", ""]
    if quick:
        lines += [f"**{QUICK_NOTE}.**", ""]
    lines += [
        f"Command: `{meta['command']}`", "",
        f"Machine: {m['cpus']} CPU cores, {m['device']}, torch {m['torch']}; {s['jobs']} run(s) at a time, "
        f"{s['threads']} thread(s) each. This invocation took **{duration(meta['wall_s'])}** of wall time "
        f"({duration(meta['runs_s'])} summed over the runs it trained; from the runs' own metrics, training spans "
        f"{duration(meta['training_span_s'])}). Load average (1 min) at its start / end: {m['load_start']:.1f} / "
        f"{m['load_end']:.1f} on {m['cpus']} cores" + (" (above the core count: other processes competed for the CPUs)." if busy else "."),
        "",
        f"Pair: teacher `{TEACHER}` ({pt:,} parameters), student `{STUDENT}` ({ps:,} parameters, {pt / ps:.1f}x fewer), "
        "both CIFAR ResNets with BatchNorm (chosen before the runs: docs/demo.md).",
        "",
        "Numbers are the **last epoch's** test top-1 (%) on the test images (no checkpoint picked on the test set), "
        f"mean ± sample standard deviation over {s['seeds']} seed(s); each teacher is trained once on its regime's split.",
    ]  # fmt: skip
    for regime, v in results.items():
        e = meta["epochs"][regime]
        lines += ["", f"## {TITLES[regime]}: {v['train_images']:,} training images, {v['val_images']:,} test images", "",
                  f"Student epochs {e['student']}, teacher epochs {e['teacher']}. Teacher − student alone (CE): "
                  f"{v['student_gap']:.2f} points.", ""]  # fmt: skip
        lines += results_table(v)
        if regime == "long-tail":
            lines += ["", "Training images per class: " + ", ".join(f"{c} {n:,}" for c, n in zip(v["classes"], v["class_counts"])) + ".",
                      "Head / middle / tail = the first / middle / last third of classes by training count; a group's "
                      "accuracy is the mean of its classes' accuracies.", ""]  # fmt: skip
            lines += group_table(v)
        lines.append("")
        if quick:
            lines.append(f"({QUICK_NOTE}.)")
        else:
            lines += ["Paired by seed (every row of a seed has the same initialisation, data order and crops):", ""]
            lines += difference_lines(v)
    lines += ["", "## Search", ""] + search_lines(meta)
    lines += ["", "## Plots", ""]
    for p in plots:
        lines += [f"![{p.stem}](plots/{p.name})", ""]
    lines += [
        "## How the numbers were made", "",
        "Every run is `wsld train CONFIG --out RUN_DIR` (stores: `wsld soft-labels CONFIG --crops E --topk 10 "
        "--precision float32 --out STORE`) with a config in `configs/`; rerun any row by hand with the same command.",
        "",
        "- data: the built-in Fashion-MNIST (`data.format=builtin`); the small-data and search splits are IDX subsets "
        "written under `data/`; augmentation random crop of the image zero-padded by 2 pixels + horizontal flip",
        "- recipe, every row: batch 128, SGD momentum 0.9 Nesterov, cosine schedule, weight decay 5e-4, no warm-up, "
        "lr x batch/256 as chosen by the search (teacher: 0.1), fp32",
        "- " + "; ".join(LOSS_TEXT[k] for k in meta["rows"] if k in LOSS_TEXT),
        "- distilled rows read the teacher's outputs from soft-label stores (one per regime and seed, crops = epochs, "
        "all 10 classes in float32: exact, the same losses as online distillation, on the batches the CE run of the "
        "same seed sees)",
        "",
        "## Runs", "",
        "| run | last top-1 | time |", "|---|---|---|",
    ]  # fmt: skip
    for run in meta["runs"]:
        t = duration(run["seconds"]) if run["seconds"] is not None else "earlier"
        top1 = f"{run['top1']:.2f}" if run["top1"] is not None else "(store)"
        lines.append(f"| {run['name']} | {top1} | {t} |")
    atomic_write_text(out / "report.md", "\n".join(lines) + "\n")
    if not quick:
        atomic_write_text(out / "readme_table.md", "\n".join(readme_table(results, pt, ps)) + "\n")

    printed = [f"*** {QUICK_NOTE} ***"] if quick else []
    for regime, v in results.items():
        printed += ["", f"Fashion-MNIST, {TITLES[regime].lower()} (test top-1 %, last epoch, mean ± std over seeds)"]
        printed += results_table(v)
        if regime == "long-tail":
            printed += group_table(v)
        if not quick:
            printed += [ln for ln in difference_lines(v) if ln and not ln.startswith("|")]
    if quick:
        printed += ["", f"*** {QUICK_NOTE} ***"]
    return "\n".join(printed)
