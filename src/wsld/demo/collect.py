"""Reads the finished runs' summary.json and metrics.jsonl into results.json's per-variant numbers."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from wsld.demo.plan import LOSS_ROWS, RunSpec
from wsld.demo.stats import mean_std


def read_metrics(run_dir: Path) -> list[dict]:
    out = []
    path = run_dir / "metrics.jsonl"
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
    return out


def class_groups(counts: list[int]) -> dict[str, list[int]]:
    """Head / middle / tail: the first, middle and last third of classes by training count
    (ties in label order); 10 classes split 3 / 4 / 3."""
    order = sorted(range(len(counts)), key=lambda k: (-counts[k], k))
    c = len(order)
    k = c // 3
    return {"head": order[:k], "middle": order[k : c - k], "tail": order[c - k :]}


def _per_epoch(records: list[dict], kind: str, key: str) -> dict[int, Any]:
    out: dict[int, Any] = {}
    for r in records:
        if r.get("kind") == kind and "epoch" in r:
            out[int(r["epoch"])] = r[key]
    return out


def collect(specs: list[RunSpec], variants: dict[str, dict], classes: list[str]) -> dict[str, Any]:
    """``results.json``'s ``variants`` part, from the runs' summary.json and metrics.jsonl."""
    res: dict[str, Any] = {}
    for variant, info in variants.items():
        counts = info["class_counts"]
        groups = class_groups(counts)
        teacher_spec = next(sp for sp in specs if sp.variant == variant and sp.loss == "teacher")
        tsum = json.loads((teacher_spec.run_dir / "summary.json").read_text(encoding="utf-8"))
        tcurve = _per_epoch(read_metrics(teacher_spec.run_dir), "eval", "top1")
        tpc = tsum["last_per_class_top1"]
        v: dict[str, Any] = {
            **info,
            "classes": classes,
            "groups": groups,
            "teacher": {
                "run": teacher_spec.name, "top1": tsum["last_top1"], "best_top1": tsum["best_top1"],
                "per_class_top1": tpc, "group_top1": {g: sum(tpc[k] for k in ks) / len(ks) for g, ks in groups.items()},
                "curve": [tcurve[e] for e in sorted(tcurve)],
            },
            "losses": {},
        }  # fmt: skip
        for loss, row, params in LOSS_ROWS:
            runs = sorted((sp for sp in specs if sp.variant == variant and sp.loss == loss), key=lambda sp: sp.seed)
            seeds = []
            for sp in runs:
                summ = json.loads((sp.run_dir / "summary.json").read_text(encoding="utf-8"))
                recs = read_metrics(sp.run_dir)
                curve = _per_epoch(recs, "eval", "top1")
                weights = _per_epoch(recs, "class_weights", "mean_weight")
                pc = summ["last_per_class_top1"]
                seeds.append({
                    "seed": sp.seed, "run": sp.name, "top1": summ["last_top1"], "best_top1": summ["best_top1"],
                    "best_epoch": summ["best_epoch"], "per_class_top1": pc,
                    "group_top1": {g: sum(pc[k] for k in ks) / len(ks) for g, ks in groups.items()},
                    "curve": [curve[e] for e in sorted(curve)],
                    "class_weights": [weights[e] for e in sorted(weights)] if weights else None,
                    "teacher_top1_seen": summ.get("teacher_top1"),
                })  # fmt: skip
            m, sd = mean_std([r["top1"] for r in seeds])
            ncls = len(classes)
            entry = {
                "row": row, "distill": {"loss": loss, **({} if loss == "ce" else params)},
                "seeds": seeds, "top1_mean": m, "top1_std": sd,
                "per_class_top1_mean": [sum(r["per_class_top1"][k] for r in seeds) / len(seeds) for k in range(ncls)],
                "group_top1": {g: dict(zip(("mean", "std"), mean_std([r["group_top1"][g] for r in seeds]))) for g in groups},
            }  # fmt: skip
            if seeds[0]["class_weights"]:
                epochs = len(seeds[0]["class_weights"])
                entry["class_weights_mean"] = [
                    [sum(r["class_weights"][e][k] for r in seeds) / len(seeds) for k in range(ncls)] for e in range(epochs)
                ]
            v["losses"][loss] = entry
        for other in ("ce", "kd"):  # paired by seed: same initialisation and data order for every loss
            diffs = [w["top1"] - o["top1"] for w, o in zip(v["losses"]["wsld"]["seeds"], v["losses"][other]["seeds"])]
            m, sd = mean_std(diffs)
            v[f"wsld_minus_{other}"] = {"mean": m, "std": sd, "per_seed": diffs, "wsld_ahead": sum(d > 0 for d in diffs)}
        res[variant] = v
    return res



def training_span(specs: list[RunSpec]) -> float:
    """Seconds from the earliest run start to the latest run end, from the runs' own metrics."""
    starts, ends = [], []
    for sp in specs:
        recs = read_metrics(sp.run_dir)
        times = [r["time"] for r in recs if "time" in r]
        if times:
            starts.append(min(times))
            ends.append(max(times))
    return max(ends) - min(starts) if starts else 0.0


