"""Reads a finished comparison's runs (summary.json, metrics.jsonl) into results.json's numbers: rows, every paired difference, verdicts, the search."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from wsld.demo.plan import ROW_BY_KEY, SHORT_NAMES, read_summary
from wsld.demo.search import describe
from wsld.demo.stats import mean_std, paired_ci


def read_metrics(run_dir: Path) -> list[dict]:
    """A run's metrics.jsonl records (unreadable lines skipped)."""
    out = []
    path = run_dir / "metrics.jsonl"
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
    return out


def eval_curve(run_dir: Path) -> list[float]:
    """Top-1 on val after each epoch, from metrics.jsonl."""
    per: dict[int, float] = {}
    for r in read_metrics(run_dir):
        if r.get("kind") == "eval" and "epoch" in r:
            per[int(r["epoch"])] = r["top1"]
    return [per[e] for e in sorted(per)]


def verdicts(rows: list[str], differences: dict[str, dict]) -> dict[str, dict[str, list[str]]]:
    """Per row, the rows it is detectably ahead of (wins), level with (ties: interval holds 0) and
    behind (loses); with one seed there is no interval, every pair is ``undecided``."""
    out = {k: {"wins": [], "ties": [], "loses": [], "undecided": []} for k in rows}
    for d in differences.values():
        a, b = d["a"], d["b"]  # mean = a - b
        if d["detectable"] is None:
            out[a]["undecided"].append(b)
            out[b]["undecided"].append(a)
        elif not d["detectable"]:
            out[a]["ties"].append(b)
            out[b]["ties"].append(a)
        elif d["mean"] > 0:
            out[a]["wins"].append(b)
            out[b]["loses"].append(a)
        else:
            out[a]["loses"].append(b)
            out[b]["wins"].append(a)
    return out


def headline(rows: list[str], differences: dict[str, dict], seeds: int) -> str:
    """Does distillation help here? One sentence from the distilled rows' differences with CE."""
    distilled = [k for k in rows if k != "ce"]
    if "ce" not in rows or not distilled:
        return "No student-alone (CE) row: whether distillation helps is not measured."
    if seeds < 2:
        return "One seed: no confidence intervals, so whether distillation helps here is not decided."
    ahead = [k for k in distilled if differences[f"{k}-ce"]["detectable"] and differences[f"{k}-ce"]["mean"] > 0]
    behind = [k for k in distilled if differences[f"{k}-ce"]["detectable"] and differences[f"{k}-ce"]["mean"] < 0]
    names = lambda ks: ", ".join(SHORT_NAMES[k] for k in ks)  # noqa: E731
    if ahead:
        text = f"Distillation helps here: {names(ahead)} {'is' if len(ahead) == 1 else 'are'} detectably ahead of the student alone (CE)"
    else:
        text = ("Distillation does not help here: no distilled row is detectably ahead of the student alone (CE)")
    text += f" at {seeds} seeds"
    if behind:
        text += f"; {names(behind)} {'is' if len(behind) == 1 else 'are'} detectably behind it"
    return text + "."


def collect(cmp: Any) -> dict[str, Any]:
    """results.json's numbers for a finished ``Comparison``."""
    s = cmp.s
    keys = list(s.rows)
    rows: dict[str, Any] = {}
    for key in keys:
        row = ROW_BY_KEY[key]
        seeds = []
        for seed in range(s.seeds):
            sp = cmp.specs[f"{key}-s{seed}"]
            summ = read_summary(sp)
            seeds.append({"seed": seed, "run": sp.name, "top1": summ["last_top1"],
                          "per_class_top1": summ["last_per_class_top1"], "curve": eval_curve(sp.run_dir)})  # fmt: skip
        m, sd = mean_std([r["top1"] for r in seeds])
        cfg = cmp.specs[f"{key}-s0"].config
        rows[key] = {"name": row.name, "loss": row.loss, "values": dict(cmp.chosen[key]),
                     "values_text": describe(cmp.chosen[key]),
                     "params": cfg.distill.params.get(row.loss) if row.distilled else None,
                     "seeds": seeds, "top1_mean": m, "top1_std": sd}  # fmt: skip
    differences = {}
    for j, b in enumerate(keys):  # every pair, the later row minus the earlier (distilled rows minus CE)
        for a in keys[:j]:
            diffs = [x["top1"] - y["top1"] for x, y in zip(rows[b]["seeds"], rows[a]["seeds"])]
            differences[f"{b}-{a}"] = {"a": b, "b": a, **paired_ci(diffs)}
    teacher: dict[str, Any] = {"model": cmp.teacher_model, "given": cmp.given_teacher, "lr": cmp.teacher_lr}
    if "teacher" in cmp.specs and cmp.specs["teacher"].done_path.is_file():
        tsum = read_summary(cmp.specs["teacher"])
        teacher.update(top1=tsum["last_top1"], curve=eval_curve(cmp.specs["teacher"].run_dir),
                       epochs=tsum["epochs"])  # fmt: skip
    else:  # a given teacher: its top-1 as the distilled runs measured it, when they ran it
        t1 = [read_summary(cmp.specs[f"{k}-s0"]).get("teacher_top1") for k in keys if ROW_BY_KEY[k].distilled]
        teacher.update(top1=next((t for t in t1 if t is not None), None), curve=[], epochs=None)
    search: dict[str, Any] = {}
    if s.search:
        groups = [("teacher", cmp.teacher_search)] if not cmp.given_teacher else []
        groups += [(k, cmp.searches[k]) for k in keys]
        for key, rs in groups:
            runs = []
            specs = [sp for sp in cmp.specs.values() if sp.phase == "search" and sp.row == key and sp.point is not None]
            for sp in specs:
                runs.append({"values": dict(sp.point), "text": describe(sp.point), "run": sp.name,
                             "heldout_top1": read_summary(sp)["last_top1"], "fill": sp.point not in rs.bracketing})  # fmt: skip
            chosen = cmp.chosen.get(key) if key != "teacher" else (("lr", cmp.teacher_lr),)
            search[key] = {
                "runs": runs, "count": len(runs), "chosen": dict(chosen) if chosen else None,
                "dims": [{"name": r.name, "grid": r.grid, "best": r.best, "extended": r.extended, "edge": r.edge,
                          "why": r.why} for r in rs.results],
                "unbracketed": [r.name for r in rs.results if r.edge],
            }  # fmt: skip
    counts = sorted({search[k]["count"] for k in keys}) if s.search else []
    ce = rows.get("ce")
    return {
        "rows_order": keys,
        "student": cmp.student_model,
        "data": {"classes": cmp.classes, "train_images": cmp.n_train, "search_train_images": cmp.n_search_train,
                 "heldout_images": cmp.n_held, "test_images": cmp.n_test, "holdout": s.holdout},
        "epochs": {"student": cmp.specs[f"{keys[0]}-s0"].config.train.epochs,
                   "teacher": teacher.get("epochs")},
        "teacher": teacher,
        "teacher_gap": (teacher["top1"] - ce["top1_mean"]) if ce and teacher.get("top1") is not None else None,
        "rows": rows,
        "differences": differences,
        "verdicts": verdicts(keys, differences),
        "headline": headline(keys, differences, s.seeds),
        "search": search,
        "search_budget": {"per_row": counts, "equal": len(counts) <= 1, "limit": s.limit},
    }
