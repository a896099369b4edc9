"""Reads the finished runs' summary.json and metrics.jsonl into results.json's per-regime numbers."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from wsld.demo.plan import Row, RunSpec, comparisons
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


def _summary(sp: RunSpec) -> dict:
    return json.loads(sp.done_path.read_text(encoding="utf-8"))


def collect(specs: list[RunSpec], regimes: dict[str, dict], classes: list[str], rows: tuple[Row, ...]) -> dict[str, Any]:
    """``results.json``'s ``regimes`` part for the rows that ran, from the runs' summary.json and metrics.jsonl."""
    res: dict[str, Any] = {}
    ncls = len(classes)
    for regime, info in regimes.items():
        counts = info["class_counts"]
        groups = class_groups(counts)
        teacher_spec = next(sp for sp in specs if sp.regime == regime and sp.row == "teacher")
        tsum = _summary(teacher_spec)
        tcurve = _per_epoch(read_metrics(teacher_spec.run_dir), "eval", "top1")
        tpc = tsum["last_per_class_top1"]
        v: dict[str, Any] = {
            **info,
            "classes": classes,
            "groups": groups,
            "teacher": {
                "run": teacher_spec.name, "top1": tsum["last_top1"], "per_class_top1": tpc,
                "group_top1": {g: sum(tpc[k] for k in ks) / len(ks) for g, ks in groups.items()},
                "curve": [tcurve[e] for e in sorted(tcurve)],
            },
            "rows": {},
        }  # fmt: skip
        for row in rows:
            runs = sorted((sp for sp in specs if sp.regime == regime and sp.row == row.key), key=lambda sp: sp.seed)
            seeds = []
            for sp in runs:
                summ = _summary(sp)
                recs = read_metrics(sp.run_dir)
                curve = _per_epoch(recs, "eval", "top1")
                weights = _per_epoch(recs, "class_weights", "mean_weight") if row.key == "wsld" else {}
                pc = summ["last_per_class_top1"]
                seeds.append({
                    "seed": sp.seed, "run": sp.name, "top1": summ["last_top1"], "per_class_top1": pc,
                    "group_top1": {g: sum(pc[k] for k in ks) / len(ks) for g, ks in groups.items()},
                    "curve": [curve[e] for e in sorted(curve)],
                    "class_weights": [weights[e] for e in sorted(weights)] if weights else None,
                })  # fmt: skip
            m, sd = mean_std([r["top1"] for r in seeds])
            cfg = runs[0].config
            entry = {
                "name": row.name, "loss": row.loss, "lr": cfg.train.lr,
                "T": cfg.distill.T if row.distilled else None, "alpha": row.alpha, "params": dict(row.params),
                "seeds": seeds, "top1_mean": m, "top1_std": sd,
                "per_class_top1_mean": [sum(r["per_class_top1"][k] for r in seeds) / len(seeds) for k in range(ncls)],
                "group_top1": {g: dict(zip(("mean", "std"), mean_std([r["group_top1"][g] for r in seeds]))) for g in groups},
            }  # fmt: skip
            if seeds[0]["class_weights"]:
                epochs = len(seeds[0]["class_weights"])
                entry["class_weights_mean"] = [
                    [sum(r["class_weights"][e][k] for r in seeds) / len(seeds) for k in range(ncls)] for e in range(epochs)
                ]
            v["rows"][row.key] = entry
        v["differences"] = {}
        # paired by seed: same initialisation, data order and crops for every row
        for a, b in comparisons(tuple(r.key for r in rows)):
            diffs = [x["top1"] - y["top1"] for x, y in zip(v["rows"][a]["seeds"], v["rows"][b]["seeds"])]
            v["differences"][f"{a}-{b}"] = {"a": a, "b": b, **paired_ci(diffs)}
        v["student_gap"] = v["teacher"]["top1"] - v["rows"]["ce"]["top1_mean"]
        res[regime] = v
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


