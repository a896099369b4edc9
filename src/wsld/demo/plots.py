"""The PNG figures of the demo's report."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

from wsld.demo.plan import COLORS, SHORT_NAMES


def save_figure(fig: Any, path: Path) -> None:
    """Writes a figure as PNG atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110, bbox_inches="tight")
    os.replace(tmp, path)


def make_plots(results: dict[str, Any], plots: Path, seeds: int, quick: bool = False) -> list[Path]:
    """The PNG figures of the report; returns their paths. ``quick``: every figure says it is a pipeline check."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.ticker import MaxNLocator

    written: list[Path] = []
    seed_note = f"mean over {seeds} seed{'s' if seeds > 1 else ''}"
    titles = {"balanced": "balanced", "long-tail": "long-tailed (ratio 100)", "small-data": "small data (a tenth of the training images)"}
    ticks = {"balanced": "balanced", "long-tail": "long-tailed\n(ratio 100)", "small-data": "small data\n(600 per class)"}  # axis labels side by side
    banner = "PIPELINE CHECK (--quick), NOT A COMPARISON\n" if quick else ""

    def save(fig, path: Path) -> None:
        if quick:
            fig.text(0.5, 0.5, "pipeline check\nnot a comparison", ha="center", va="center", fontsize=28,
                     color="red", alpha=0.25, rotation=20, transform=fig.transFigure)
        save_figure(fig, path)
        plt.close(fig)
        written.append(path)

    # 1. test top-1 per epoch, per variant
    for variant, v in results.items():
        fig, ax = plt.subplots(figsize=(7, 4.2))
        for loss, entry in v["rows"].items():
            curves = np.array([r["curve"] for r in entry["seeds"]], dtype=float)
            x = np.arange(1, curves.shape[1] + 1)
            ax.plot(x, curves.mean(0), marker="o", ms=3, color=COLORS[loss], label=SHORT_NAMES[loss])
            if len(curves) > 1:
                ax.fill_between(x, curves.min(0), curves.max(0), color=COLORS[loss], alpha=0.15)
        ax.axhline(v["teacher"]["top1"], color=COLORS["teacher"], ls="--", label=f"teacher ({v['teacher']['top1']:.2f})")
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel("test top-1 (%)")
        band = ", band = min..max over seeds" if seeds > 1 else ""
        ax.set_title(f"{banner}Fashion-MNIST {titles[variant]}: student test top-1 per epoch\n({seed_note}{band})")
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right")
        path = plots / f"curves_{variant}.png"
        save(fig, path)

    # 2. final top-1 with error bars over seeds
    fig, ax = plt.subplots(figsize=(7, 4.2))
    names = ["teacher", *next(iter(results.values()))["rows"]]
    width = 0.8 / len(names)
    lows = []
    for i, name in enumerate(names):
        xs, ys, es = [], [], []
        for j, (variant, v) in enumerate(results.items()):
            if name == "teacher":
                y, e = v["teacher"]["top1"], 0.0
            else:
                y, e = v["rows"][name]["top1_mean"], v["rows"][name]["top1_std"] or 0.0
            xs.append(j + (i - (len(names) - 1) / 2) * width)
            ys.append(y)
            es.append(e)
            lows.append(y)
        label = "teacher (1 run)" if name == "teacher" else SHORT_NAMES[name]
        bars = ax.bar(xs, ys, width, yerr=es, capsize=3, color=COLORS[name], label=label)
        ax.bar_label(bars, labels=[f"{y:.1f}" for y in ys], fontsize=7, padding=2)
    ax.set_xticks(range(len(results)), [ticks[v] for v in results])
    ax.set_ylim(max(0.0, math.floor(min(lows) / 5) * 5 - 5), 100)
    ax.set_ylabel("test top-1 (%), last epoch")
    ax.set_title(f"{banner}Fashion-MNIST: final test top-1 ({seed_note}, error bar = std over seeds)")
    ax.legend(loc="upper right", fontsize=8, ncol=min(5, len(names)))
    ax.grid(axis="y", alpha=0.3)
    path = plots / "final_top1.png"
    save(fig, path)

    # 3. WSLD weight per class per epoch, next to per-class accuracy of CE vs WSLD
    for variant, v in results.items():
        weights = v["rows"]["wsld"].get("class_weights_mean")
        if not weights:
            continue
        w = np.array(weights, dtype=float).T  # classes x epochs
        classes = v["classes"]
        counts = v["class_counts"]
        labels = [f"{c} ({n:,})" for c, n in zip(classes, counts)]
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.8), gridspec_kw={"width_ratios": [1.15, 1]})
        im = ax1.imshow(w, aspect="auto", cmap="viridis", origin="upper",
                        extent=(0.5, w.shape[1] + 0.5, len(classes) - 0.5, -0.5))
        ax1.set_yticks(range(len(classes)), labels)
        ax1.set_xlabel("epoch")
        ax1.set_xticks(range(1, w.shape[1] + 1))
        ax1.set_title(f"mean WSLD sample weight per class and epoch\n({seed_note}; class (training images))")
        fig.colorbar(im, ax=ax1, label="mean weight 1 - exp(-CE_s / CE_t)")
        y = np.arange(len(classes))
        ce_acc = v["rows"]["ce"]["per_class_top1_mean"]
        ws_acc = v["rows"]["wsld"]["per_class_top1_mean"]
        ax2.barh(y - 0.2, ce_acc, 0.4, color=COLORS["ce"], label="CE (student alone)")
        ax2.barh(y + 0.2, ws_acc, 0.4, color=COLORS["wsld"], label="WSLD")
        ax2.scatter(v["teacher"]["per_class_top1"], y, marker="|", s=120, color="black", label="teacher", zorder=3)
        ax2.set_yticks(y, [""] * len(classes))
        ax2.set_ylim(len(classes) - 0.5, -0.5)
        ax2.set_xlim(max(0.0, math.floor(min(ce_acc + ws_acc) / 10) * 10 - 10), 100)
        ax2.set_xlabel("test top-1 of the class (%), last epoch")
        ax2.set_title(f"per-class test accuracy, CE vs WSLD ({seed_note})")
        ax2.legend(loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=3, fontsize=8)
        ax2.grid(axis="x", alpha=0.3)
        fig.suptitle(f"{banner}Fashion-MNIST {titles[variant]}: where WSLD puts its weight")
        fig.tight_layout()
        path = plots / f"wsld_weights_{variant}.png"
        save(fig, path)

    # 4. long-tailed: per-class accuracy of every method against the training count
    if "long-tail" in results:
        v = results["long-tail"]
        classes, counts = v["classes"], v["class_counts"]
        fig, ax = plt.subplots(figsize=(10, 4.8))
        x = np.arange(len(classes))
        series = [("teacher", v["teacher"]["per_class_top1"])] + [(k, e["per_class_top1_mean"]) for k, e in v["rows"].items()]
        width = 0.8 / len(series)
        for i, (name, acc) in enumerate(series):
            ax.bar(x + (i - (len(series) - 1) / 2) * width, acc, width, color=COLORS[name],
                   label="teacher" if name == "teacher" else SHORT_NAMES[name])
        for g, ks in v["groups"].items():
            ax.axvspan(min(ks) - 0.5, max(ks) + 0.5, color="grey", alpha=0.06 if g == "middle" else 0.0)
            ax.text((min(ks) + max(ks)) / 2, 101, g, ha="center", va="bottom", fontsize=9)
        ax.set_xticks(x, [f"{c}\n{n:,}" for c, n in zip(classes, counts)], fontsize=8)
        ax.set_ylim(0, 108)
        ax.set_ylabel("test top-1 of the class (%)")
        ax.set_xlabel("class (training images in the long-tailed split)")
        ax.set_title(f"{banner}Fashion-MNIST long-tailed (ratio 100): per-class test accuracy ({seed_note})", pad=18)
        ax.legend(loc="lower left", fontsize=8, ncol=5)
        ax.grid(axis="y", alpha=0.3)
        path = plots / "long_tail_per_class.png"
        save(fig, path)

    # 5. paired differences with their 95% CIs (not for a pipeline check: it has no comparison)
    if not quick and seeds > 1:
        fig, ax = plt.subplots(figsize=(8, 4.2))
        pairs = [(d["a"], d["b"]) for d in next(iter(results.values()))["differences"].values()]
        width = 0.8 / len(pairs)
        for i, (a, b) in enumerate(pairs):
            xs, ys, lo, hi = [], [], [], []
            for j, v in enumerate(results.values()):
                d = v["differences"][f"{a}-{b}"]
                xs.append(j + (i - (len(pairs) - 1) / 2) * width)
                ys.append(d["mean"])
                lo.append(d["mean"] - d["low"])
                hi.append(d["high"] - d["mean"])
            ax.bar(xs, ys, width, yerr=[lo, hi], capsize=3, color=COLORS[b], alpha=0.8,
                   label=f"{SHORT_NAMES[a]} − {SHORT_NAMES[b]}")
        ax.axhline(0, color="black", lw=0.8)
        ax.set_xticks(range(len(results)), [ticks[r] for r in results])
        ax.set_ylabel("difference in test top-1 (points)")
        ax.set_title(f"paired differences, mean over {seeds} seeds, error bar = 95% CI (t distribution)")
        ax.legend(fontsize=8)
        ax.grid(axis="y", alpha=0.3)
        save(fig, plots / "paired_differences.png")
    return written
