"""A comparison's report.md (and the text printed at its end): results, every paired difference, verdicts in words, the search, plots, runs."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from wsld.demo.plan import SHORT_NAMES
from wsld.demo.runner import duration
from wsld.demo.stats import ci_sentence


def fmt(m: float, sd: Optional[float]) -> str:
    """``91.20 ± 0.31`` (no ± for one value)."""
    return f"{m:.2f} ± {sd:.2f}" if sd is not None else f"{m:.2f}"


def _epochs(n: int) -> str:
    return f"{n} epoch{'s' if n != 1 else ''}"


def _names(keys: list[str]) -> str:
    return ", ".join(SHORT_NAMES[k] for k in keys)


def time_sentence(meta: dict[str, Any]) -> str:
    """Wall and CPU time of the invocations that trained the runs (one, unless it was interrupted), and the estimate."""
    inv = meta.get("invocations") or []
    est = meta["estimate_s"]
    estimate = duration(est["wall_low"]) + (f" to {duration(est['wall_high'])}" if est["wall_high"] > est["wall_low"] else "")
    if not inv:
        m = meta["machine"]
        return (f"Every run was reused from an earlier invocation; this one took {duration(meta['wall_s'])} of wall time "
                f"(estimate for the whole comparison: {estimate}; load average {m['load_start']:.1f}).")
    wall, cpu = sum(i["wall_s"] for i in inv), sum(i["cpu_s"] for i in inv)
    where = "in one invocation" if len(inv) == 1 else f"summed over {len(inv)} invocations (it was interrupted and continued)"
    first = inv[0]
    if "estimate_wall_s" in first:  # what was printed before the first run started
        lo, hi = first["estimate_wall_s"]
        said = f"estimated before it started: {duration(lo)}" + (f" to {duration(hi)}" if hi > lo else "") + " of wall time"
    else:
        said = "the estimate it printed before it started is in its console output"
    busy = max(first["load_start"], first["load_end"]) > meta["machine"]["cpus"]
    return (f"Training took **{duration(wall)}** of wall time and **{duration(cpu)}** of CPU time (the command's "
            f"own process and its runs), {where}, started {first['started']}; {said}. Load average (1 min) at the start / end of that training: {first['load_start']:.1f} / "
            f"{first['load_end']:.1f}" + (" (above the core count: other programs competed for the CPU)." if busy else "."))


def results_table(res: dict[str, Any]) -> list[str]:
    t = res["teacher"]
    seeds = [r["seed"] for r in next(iter(res["rows"].values()))["seeds"]]
    lines = [f"| model | row | values | test top-1 (%) | per seed ({', '.join(map(str, seeds))}) |", "|---|---|---|---|---|"]
    if t.get("top1") is not None:
        how = "given" if t["given"] else f"lr {t['lr']:g}"
        lines.append(f"| {t['model']} | teacher | {how} | {t['top1']:.2f} (one run) | {t['top1']:.2f} |")
    for key, e in res["rows"].items():
        per_seed = ", ".join(f"{r['top1']:.2f}" for r in e["seeds"])
        lines.append(f"| {res['student']} | {e['name']} | {e['values_text']} | {fmt(e['top1_mean'], e['top1_std'])} | {per_seed} |")
    return lines


def difference_lines(res: dict[str, Any]) -> list[str]:
    """Every paired difference: a table, then one sentence each."""
    lines = ["| difference (points) | mean | 95% CI (t, over seeds) | per seed |", "|---|---|---|---|"]
    sentences = []
    for d in res["differences"].values():
        ci = f"[{d['low']:+.2f}, {d['high']:+.2f}]" if d["low"] is not None else "(one seed: none)"
        lines.append(f"| {SHORT_NAMES[d['a']]} − {SHORT_NAMES[d['b']]} | {d['mean']:+.2f} | {ci} | "
                     f"{', '.join(f'{x:+.2f}' for x in d['per_seed'])} |")  # fmt: skip
        sentences.append(ci_sentence(SHORT_NAMES[d["a"]], SHORT_NAMES[d["b"]], d))
    return lines + [""] + sentences


def verdict_lines(res: dict[str, Any]) -> list[str]:
    """Per row, in words: where it wins, ties and loses."""
    out = []
    for key, v in res["verdicts"].items():
        parts = []
        if v["wins"]:
            parts.append(f"ahead of {_names(v['wins'])}")
        if v["ties"]:
            parts.append(f"level with {_names(v['ties'])} (no detectable difference)")
        if v["loses"]:
            parts.append(f"behind {_names(v['loses'])}")
        if v["undecided"]:
            parts.append(f"undecided against {_names(v['undecided'])} (one seed: no interval)")
        out.append(f"- **{SHORT_NAMES[key]}**: " + ("; ".join(parts) if parts else "the only row") + ".")
    return out


def search_lines(res: dict[str, Any]) -> list[str]:
    """How the values were chosen: per row every run with its held-out score, the chosen one in bold, flags."""
    srch, budget = res["search"], res["search_budget"]
    d = res["data"]
    lines = [
        f"Every value was chosen on held-out training images: {d['heldout_images']:,} images ({d['holdout']:.0%} of "
        f"each class's training images, a fixed draw) that the search runs never trained on; they trained on the other "
        f"{d['search_train_images']:,}, seed 0, with the final runs' recipe. The test images were not used for any choice.",
        "",
        "Per row, one value at a time (lr, then T, then the loss's weight), on a log grid of factor 2 "
        "(KD: its label weight 1 − alpha), starting from the config's values: three points, and one more beyond an "
        f"edge while the best point sits at that edge, at most {budget['limit']} more per value. Then every row gets "
        "learning-rate points between its grid points until it has as many runs as the row that needed the most.",
        "",
    ]
    if budget["equal"]:
        lines.append(f"**Every row had the same search budget: {budget['per_row'][0]} runs.**")
    else:
        counts = ", ".join(f"{SHORT_NAMES[k]} {srch[k]['count']}" for k in res["rows_order"])
        lines.append(f"**The rows did not get the same number of search runs** ({counts}): the fill between grid "
                     "points ran out of new points.")
    flagged = [k for k in srch if srch[k]["unbracketed"]]
    if flagged:
        lines += ["", "**Not bracketed** (the best point is still at the edge of its grid after the limit, so a "
                  "better value may lie beyond it; rerun with a larger --search-limit):"]
        for k in flagged:
            for dim in srch[k]["dims"]:
                if dim["edge"]:
                    why = "the search limit" if dim["why"] == "limit" else "the edge of its allowed range"
                    lines.append(f"- {SHORT_NAMES.get(k, k)}: {dim['name']} at the {dim['edge']} edge "
                                 f"({dim['best']:g}, grid {', '.join(f'{g:g}' for g in dim['grid'])}), stopped by {why}")
    else:
        lines += ["", "Every chosen value lies inside its grid (bracketed)."]
    lines += ["", "| row | runs | held-out top-1 of each run (values) | chosen |", "|---|---|---|---|"]
    for k, v in srch.items():
        cells = []
        for r in sorted(v["runs"], key=lambda r: -r["heldout_top1"]):
            text = f"{r['heldout_top1']:.2f} ({r['text']}{', fill' if r['fill'] else ''})"
            cells.append(f"**{text}**" if r["values"] == v["chosen"] else text)
        chosen = ", ".join(f"{a} {b:g}" for a, b in (v["chosen"] or {}).items())
        lines.append(f"| {SHORT_NAMES.get(k, k)} | {v['count']} | {'; '.join(cells)} | {chosen} |")
    return lines


def write_report(out: Path, res: dict[str, Any], meta: dict[str, Any], plots: list[Path]) -> str:
    """``report.md``; returns the short text printed at the end."""
    from wsld.files import atomic_write_text

    m, d, st = meta["machine"], res["data"], meta["settings"]
    quick = meta.get("quick_note")
    lines = [f"# wsld compare: {', '.join(SHORT_NAMES[k] for k in res['rows_order'])}", ""]
    if quick:
        lines += [f"**{quick}.**", ""]
    else:
        lines += [f"**{res['headline']}**", ""]
    lines += [
        f"Command: `{meta['command']}`", "",
        f"Machine: {m['cpus']} CPU cores, {m['device']}, torch {m['torch']}; {meta['jobs']} run(s) at a time, "
        f"{meta['threads']} thread(s) each. " + time_sentence(meta), "",
        f"Data: {d['classes']} classes, {d['train_images']:,} training images, {d['test_images']:,} test (val split) "
        f"images. Student `{res['student']}`, {_epochs(res['epochs']['student'])} per run; teacher "
        f"`{res['teacher']['model']}`" + (" (given)" if res["teacher"]["given"] else
        f", {_epochs(res['epochs']['teacher'])}, trained here" + (" at its own searched rate" if res["search"] else
        " at teacher_train.lr")) + ".", "",
        f"Numbers are the last epoch's top-1 (%) on the test images, mean ± sample std over {st['seeds']} seed(s); "
        "the rows of one seed share the initialisation, data order and crops, so differences are paired by seed.",
    ]  # fmt: skip
    if res["teacher_gap"] is not None:
        lines += ["", f"Teacher − student alone (CE): **{res['teacher_gap']:+.2f} points**."]
    lines += ["", "## Results", ""] + results_table(res)
    if not quick:
        lines += ["", "## Where each loss wins, ties and loses", ""] + verdict_lines(res)
        lines += ["", "## Every paired difference", ""] + difference_lines(res)
    if res["search"]:
        lines += ["", "## Search", ""] + search_lines(res)
    else:
        lines += ["", "## Values", "", "No search (--no-search): every row used the config's lr and T and its loss's "
                  "published parameters; the teacher was " + ("given." if res["teacher"]["given"] else
                  "trained at teacher_train.lr.")]  # fmt: skip
    lines += ["", "## Plots", ""] + [f"![{p.stem}](plots/{p.name})\n" for p in plots]
    lines += ["## Runs", "", "Every run is `wsld train OUT/configs/<run>.yaml --out OUT/runs/<run>` (stores: "
              "`wsld soft-labels ... --topk <classes> --precision float32`, exact); its log is OUT/logs/<run>.log.", "",
              "| run | top-1 | time |", "|---|---|---|"]  # fmt: skip
    for run in meta["runs"]:
        t = duration(run["seconds"]) if run["seconds"] is not None else "earlier"
        top1 = f"{run['top1']:.2f}" if run["top1"] is not None else "(store)"
        lines.append(f"| {run['name']} | {top1} | {t} |")
    atomic_write_text(out / "report.md", "\n".join(lines) + "\n")

    printed = [f"*** {quick} ***"] if quick else [res["headline"]]
    printed += [""] + results_table(res)
    if not quick:
        printed += [""] + verdict_lines(res)
    if res["search"]:
        flagged = [k for k, v in res["search"].items() if v["unbracketed"]]
        if flagged:
            printed += ["", "not bracketed (best value at the edge of its grid after the limit): "
                        + ", ".join(f"{SHORT_NAMES.get(k, k)} {'/'.join(res['search'][k]['unbracketed'])}" for k in flagged)]
    return "\n".join(printed)
