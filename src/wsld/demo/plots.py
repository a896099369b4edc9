"""The PNG figures of a comparison's report: final top-1, every paired difference, the search, the test curves."""

from __future__ import annotations

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


def make_plots(res: dict[str, Any], plots: Path, quick: bool = False) -> list[Path]:
    """The figures; returns their paths. ``quick``: every figure says it is a pipeline check."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written: list[Path] = []
    keys = res["rows_order"]
    seeds = len(res["rows"][keys[0]]["seeds"])

    def save(fig: Any, name: str) -> None:
        if quick:
            fig.text(0.5, 0.5, "pipeline check\nnot a comparison", ha="center", va="center", fontsize=28,
                     color="red", alpha=0.25, rotation=20, transform=fig.transFigure)
        path = plots / name
        save_figure(fig, path)
        plt.close(fig)
        written.append(path)

    # final test top-1: one dot per seed, the mean as a bar
    fig, ax = plt.subplots(figsize=(1.2 + 1.1 * len(keys), 3.6))
    for i, k in enumerate(keys):
        e = res["rows"][k]
        ax.bar(i, e["top1_mean"], color=COLORS[k], alpha=0.35, width=0.6)
        ax.scatter([i] * len(e["seeds"]), [r["top1"] for r in e["seeds"]], color=COLORS[k], zorder=3, s=18)
    t1 = res["teacher"].get("top1")
    if t1 is not None:
        ax.axhline(t1, color=COLORS["teacher"], ls="--", lw=1, label=f"teacher {t1:.2f}")
        ax.legend(loc="lower right", fontsize=8)
    lows = [r["top1"] for k in keys for r in res["rows"][k]["seeds"]] + ([t1] if t1 is not None else [])
    ax.set_ylim(min(lows) - 2, max(lows) + 1)
    ax.set_xticks(range(len(keys)), [SHORT_NAMES[k] for k in keys], fontsize=8)
    ax.set_ylabel("test top-1 (%)")
    ax.set_title(f"last-epoch test top-1, {seeds} seed(s) (dots) and mean (bars)", fontsize=9)
    save(fig, "final_top1.png")

    # every paired difference with its 95% interval
    diffs = list(res["differences"].values())
    if diffs and seeds > 1 and not quick:
        fig, ax = plt.subplots(figsize=(6, 0.9 + 0.35 * len(diffs)))
        for i, d in enumerate(diffs):
            color = "#2ca02c" if d["detectable"] and d["mean"] > 0 else "#d62728" if d["detectable"] else "#777777"
            ax.errorbar(d["mean"], i, xerr=[[d["mean"] - d["low"]], [d["high"] - d["mean"]]], fmt="o", color=color, capsize=3)
        ax.axvline(0, color="black", lw=0.8)
        ax.set_yticks(range(len(diffs)), [f"{SHORT_NAMES[d['a']]} − {SHORT_NAMES[d['b']]}" for d in diffs], fontsize=8)
        ax.invert_yaxis()
        ax.set_xlabel("paired difference, points (95% CI over seeds)")
        ax.set_title("every pair of rows: green ahead, red behind, grey no detectable difference", fontsize=9)
        save(fig, "paired_differences.png")

    # the search: held-out top-1 against the learning rate, per row, at the values its lr search held fixed
    srch = res["search"]
    if srch:
        from matplotlib.ticker import FuncFormatter, NullFormatter

        fig, ax = plt.subplots(figsize=(6.4, 3.8))
        for k, v in srch.items():
            if not v["runs"]:
                continue
            fixed = {n: x for n, x in v["runs"][0]["values"].items() if n != "lr"}  # the start values of T, weight
            pts = sorted((r["values"]["lr"], r["heldout_top1"]) for r in v["runs"]
                         if all(r["values"].get(n) == x for n, x in fixed.items()))
            color = COLORS.get(k, "#000000")
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", color=color, label=SHORT_NAMES.get(k, k), ms=4)
            chosen = [p for p in pts if p[0] == v["chosen"]["lr"]]
            if chosen:
                ax.scatter([chosen[0][0]], [chosen[0][1]], s=90, facecolors="none", edgecolors=color)
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{x:g}"))
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("learning rate (T and the loss's weight at their start values, as in the lr search)")
        ax.set_ylabel("held-out top-1 (%)")
        ax.set_title("learning-rate search on held-out training images (circled: the chosen rate)", fontsize=9)
        ax.legend(fontsize=8)
        save(fig, "search_lr.png")

    # test top-1 after each epoch, mean over seeds
    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    for k in keys:
        curves = [r["curve"] for r in res["rows"][k]["seeds"] if r["curve"]]
        if curves:
            n = min(len(c) for c in curves)
            ax.plot(range(1, n + 1), [sum(c[e] for c in curves) / len(curves) for e in range(n)], "o-",
                    color=COLORS[k], label=SHORT_NAMES[k], ms=3)
    if res["teacher"].get("curve"):
        c = res["teacher"]["curve"]
        ax.plot(range(1, len(c) + 1), c, "--", color=COLORS["teacher"], label="teacher")
    ax.set_xlabel("epoch")
    ax.set_ylabel("test top-1 (%)")
    ax.set_title(f"test top-1 per epoch, mean over {seeds} seed(s)", fontsize=9)
    ax.legend(fontsize=8)
    save(fig, "curves.png")
    return written
