"""The demo's settings and its runs: one config each (teachers, soft-label stores, search, students), their order and the search's choice."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from wsld.errors import UserError

TEACHER, STUDENT = "cifar_resnet20_s2", "cifar_resnet8_s2"  # pre-registered in docs/demo.md
REGIMES = ("balanced", "long-tail", "small-data")
LONG_TAIL_RATIO = 100.0
TEACHER_LR = 0.1  # per 256 images, like every rate here; scaled linearly with the batch


@dataclass(frozen=True)
class Row:
    """One row of the table: a loss with its fixed values and its search grid of (lr, T)."""

    key: str  # run-name part and results key
    name: str  # the row's name in the tables
    loss: str  # distill.loss
    alpha: Optional[float]  # distill.alpha; None: the loss has none (ce, dist), the pinned unused 0.9 is written
    params: dict = field(default_factory=dict)  # distill.params
    grid: tuple = ()  # (lr, T or None), in tie-break order
    warmup_share: float = 0.0  # > 0: distill.params.warmup_epochs = this share of the run's epochs (dkd)

    @property
    def distilled(self) -> bool:
        return self.loss != "ce"


def _distill_grid(first_t: float, other_t: float) -> tuple:
    """2 rates x 2 temperatures, the recipe's T first (the first point wins ties)."""
    return tuple((lr, t) for t in (first_t, other_t) for lr in (0.05, 0.1))


DKD_WARMUP_SHARE = 20 / 240  # the paper's CIFAR-100 warm-up, 20 of 240 epochs, kept as a share of the run (docs/demo.md)
ROWS = (  # every row the demo can run, in table order
    Row("ce", "Original (CE)", "ce", None, {}, tuple((lr, None) for lr in (0.025, 0.05, 0.1, 0.2))),
    Row("kd", "KD (alpha 0.9)", "kd", 0.9, {}, _distill_grid(4.0, 2.0)),
    Row("wsld", "WSLD (alpha 2.5)", "wsld", 2.5, {}, _distill_grid(2.0, 4.0)),
    Row("wsld_w1", "WSLD, weights fixed at 1 (alpha 2.5)", "wsld", 2.5, {"weighting": "off"}, _distill_grid(2.0, 4.0)),
    Row("dkd", "DKD (alpha 1, beta 8)", "dkd", 1.0, {"beta": 8.0, "ce_weight": 1.0}, _distill_grid(4.0, 2.0),
        warmup_share=DKD_WARMUP_SHARE),
    Row("dist", "DIST (beta 1, gamma 1, weight 2)", "dist", None, {"beta": 1.0, "gamma": 1.0, "weight": 2.0},
        _distill_grid(1.0, 4.0)),
)
ROW_BY_KEY = {r.key: r for r in ROWS}
DEFAULT_ROWS = ("ce", "kd", "wsld", "wsld_w1")  # the pre-registered comparison (docs/demo.md)
ALWAYS_ROWS = ("ce", "wsld")  # every paired difference is WSLD minus another row; the teacher's gap is against CE
SHORT_NAMES = {"teacher": "teacher", "ce": "CE", "kd": "KD", "wsld": "WSLD", "wsld_w1": "WSLD (w = 1)", "dkd": "DKD",
               "dist": "DIST"}  # fmt: skip
COLORS = {"teacher": "#555555", "ce": "#1f77b4", "kd": "#ff7f0e", "wsld": "#2ca02c", "wsld_w1": "#9467bd",
          "dkd": "#d62728", "dist": "#8c564b"}  # fmt: skip
COMPARISONS = (("wsld", "ce"), ("wsld", "kd"), ("wsld", "wsld_w1"), ("wsld", "dkd"), ("wsld", "dist"))  # first minus second


def comparisons(rows: tuple[str, ...]) -> tuple[tuple[str, str], ...]:
    """The paired differences among the rows that ran, in ``COMPARISONS`` order."""
    return tuple((a, b) for a, b in COMPARISONS if a in rows and b in rows)


@dataclass
class Settings:
    """Everything that shapes the demo's runs; the full and the quick demo differ only here."""

    seeds: int = 3
    regimes: tuple[str, ...] = REGIMES
    epochs: dict = field(default_factory=lambda: {"balanced": 3, "long-tail": 6, "small-data": 10})
    teacher_epochs: dict = field(default_factory=lambda: {"balanced": 4, "long-tail": 6, "small-data": 10})
    train_per_class: Optional[int] = None  # None: all 6,000 training images per class
    val_per_class: Optional[int] = None  # None: all 1,000 test images per class
    small_per_class: int = 600  # small-data training split = the search's training split
    heldout_per_class: int = 500  # the search's held-out training images per class
    batch_size: int = 128
    jobs: int = 2
    threads: int = 1
    quick: bool = False
    source: Optional[str] = None  # folder with the Fashion-MNIST IDX files (None: the system location)
    rows: tuple[str, ...] = DEFAULT_ROWS  # Row keys, in ROWS order

    @property
    def search_epochs(self) -> int:
        return self.epochs["small-data"]

    @property
    def chosen_rows(self) -> tuple[Row, ...]:
        return tuple(ROW_BY_KEY[k] for k in self.rows)


QUICK = dict(seeds=1, epochs={r: 1 for r in REGIMES}, teacher_epochs={r: 2 for r in REGIMES}, train_per_class=200,
             val_per_class=200, small_per_class=50, heldout_per_class=50)  # fmt: skip


@dataclass
class RunSpec:
    """One planned process: a ``wsld train`` run (teacher, search or student) or a ``wsld soft-labels`` store."""

    name: str
    regime: str  # "search" for the search runs
    row: str  # "teacher", "store" or a Row key
    seed: int
    config: Any  # wsld.config.Config
    config_path: Path
    run_dir: Path
    log_path: Path
    deps: list[str] = field(default_factory=list)
    cost: float = 1.0  # relative CPU cost, for the progress bar's ETA
    steps_total: int = 1
    crops: int = 0  # stores: crops per image
    grid: tuple = ()  # search runs: (lr, T)

    @property
    def is_store(self) -> bool:
        return self.row == "store"

    @property
    def done_path(self) -> Path:
        return self.run_dir.with_name(self.run_dir.name + ".done") if self.is_store else self.run_dir / "summary.json"

    def argv(self, state: str) -> list[str]:
        """The ``wsld`` arguments of this run (progress bars off: the demo shows its own)."""
        if self.is_store:
            return ["soft-labels", str(self.config_path), "--crops", str(self.crops), "--topk", "10",
                    "--precision", "float32", "--out", str(self.run_dir)]  # fmt: skip
        if state == "resume":
            return ["train", str(self.config_path), "--resume", str(self.run_dir), "train.progress=false"]
        return ["train", str(self.config_path), "--out", str(self.run_dir), "train.progress=false"]


@dataclass
class DataPaths:
    """The IDX folders of the runs: ``full`` (None: the system location), ``small`` and ``search``."""

    full: Optional[str]
    small: str
    search: str


def run_config(s: Settings, data_path: Optional[str], regime: str, row: str, seed: int, epochs: int, lr: float,
               T: Optional[float] = None, teacher_weights: Optional[Path] = None,
               soft_labels: Optional[Path] = None) -> Any:
    """The full config of one run: one recipe for every row, only ``distill`` (and the lr) differs."""
    from wsld.config import config_from_dict, validate

    r = ROW_BY_KEY.get(row)
    distill: dict = {"loss": "ce", "T": 4.0, "alpha": 0.9}
    if r is not None and r.distilled:
        params = dict(r.params)
        if r.warmup_share > 0:
            params["warmup_epochs"] = r.warmup_share * epochs
        distill = {"loss": r.loss, "T": T, "alpha": r.alpha if r.alpha is not None else distill["alpha"],
                   "params": params, "soft_labels": str(soft_labels.resolve()) if soft_labels else None}  # fmt: skip
    d = {
        "data": {"dataset": "fashion-mnist", "format": "builtin", "data_path": data_path, "batch_size": s.batch_size,
                 "val_batch_size": 500, "workers": 0, "augment": True, "hflip": True,
                 "long_tail_ratio": LONG_TAIL_RATIO if regime == "long-tail" else 1.0},
        "model": {"teacher": TEACHER, "student": TEACHER if row in ("teacher", "store") else STUDENT,
                  "teacher_weights": str(teacher_weights.resolve()) if teacher_weights else None,
                  "teacher_bn_mode": "eval", "channels_last": True},
        "distill": distill,
        "train": {"epochs": epochs, "lr": lr, "base_batch_size": 256, "optimizer": "sgd", "momentum": 0.9,
                  "nesterov": True, "weight_decay": 5e-4, "schedule": "cosine", "warmup_epochs": 0.0, "amp": "off",
                  "seed": seed, "log_every": 25, "progress": True},
        # unused (teachers are their own runs, given as weights); pinned so that a new built-in
        # default does not make finished demo runs look like runs of other settings
        "teacher_train": {"epochs": 4, "lr": 0.1, "weight_decay": 5e-4, "schedule": "cosine"},
        "checkpoint": {"every_steps": 100},
    }  # fmt: skip
    cfg = config_from_dict(d)
    validate(cfg)
    return cfg


def train_counts(cfg: Any) -> tuple[list[int], int]:
    """Training images per class (after the long-tail cut) and the val size, as the engine sees them."""
    from wsld.data.build import build_datasets

    train, val, info = build_datasets(cfg.data, seed=cfg.train.seed)
    counts = [0] * info.num_classes
    for y in train.targets:
        counts[y] += 1
    return counts, len(val)


# relative CPU cost per image (about microseconds on one core), measured for the pair (docs/demo.md)
COST_TRAIN = {"teacher": 710.0, "student": 310.0, "store": 250.0}
COST_EVAL = {"teacher": 230.0, "student": 90.0, "store": 0.0}


def _spec(out: Path, name: str, regime: str, row: str, seed: int, cfg: Any, deps: list[str], n_train: int,
          n_val: int, crops: int = 0, grid: tuple = ()) -> RunSpec:
    kind = row if row in ("teacher", "store") else "student"
    epochs = crops or cfg.train.epochs
    cost = epochs * (n_train * COST_TRAIN[kind] + n_val * COST_EVAL[kind]) + 3e6  # + start-up
    steps = epochs * max(1, n_train // cfg.data.batch_size)
    run_dir = out / ("stores" if row == "store" else "runs") / name
    return RunSpec(name, regime, row, seed, cfg, out / "configs" / f"{name}.yaml", run_dir,
                   out / "logs" / f"{name}.log", deps, cost, steps, crops, grid)


def regime_data(paths: DataPaths, regime: str) -> Optional[str]:
    """The IDX folder of a regime's runs (None: the system location)."""
    return paths.small if regime == "small-data" else paths.full


def plan_phase1(out: Path, paths: DataPaths, s: Settings) -> tuple[list[RunSpec], dict[str, dict]]:
    """Teachers (every regime; small-data always: the search uses it), stores (regime x seed) and the
    search (every row x grid point, seed 0, on the small-data split scored on held-out training images)."""
    specs: list[RunSpec] = []
    regimes: dict[str, dict] = {}
    for regime in dict.fromkeys(("small-data", *s.regimes)):
        data = regime_data(paths, regime)
        tcfg = run_config(s, data, regime, "teacher", 0, s.teacher_epochs[regime], TEACHER_LR)
        counts, n_val = train_counts(tcfg)
        regimes[regime] = {"class_counts": counts, "train_images": sum(counts), "val_images": n_val}
        tname = f"{regime}-teacher"
        specs.append(_spec(out, tname, regime, "teacher", 0, tcfg, [], sum(counts), n_val))
        weights = out / "runs" / tname / "last.pt"
        for seed in range(s.seeds if regime in s.regimes else 1):
            scfg = run_config(s, data, regime, "store", seed, s.epochs[regime], TEACHER_LR, teacher_weights=weights)
            specs.append(_spec(out, f"{regime}-store-s{seed}", regime, "store", seed, scfg, [tname], sum(counts), 0,
                               crops=s.epochs[regime]))
    store0 = out / "stores" / "small-data-store-s0"
    n_train = regimes["small-data"]["train_images"]
    for row in s.chosen_rows:
        for lr, T in row.grid:
            cfg = run_config(s, paths.search, "small-data", row.key, 0, s.search_epochs, lr, T,
                             teacher_weights=out / "runs" / "small-data-teacher" / "last.pt" if row.distilled else None,
                             soft_labels=store0 if row.distilled else None)
            name = f"search-{row.key}-lr{lr:g}" + (f"-T{T:g}" if T is not None else "")
            n_val = 10 * s.heldout_per_class
            specs.append(_spec(out, name, "search", row.key, 0, cfg, ["small-data-store-s0"] if row.distilled else [],
                               n_train, n_val, grid=(lr, T)))
    return specs, {r: regimes[r] for r in s.regimes}


def select(specs: list[RunSpec], rows: tuple[Row, ...]) -> dict[str, dict]:
    """Per row, the grid point whose run ends best on the held-out images (ties: the first in the grid)."""
    out: dict[str, dict] = {}
    for row in rows:
        table = []
        for lr, T in row.grid:
            sp = next(sp for sp in specs if sp.regime == "search" and sp.row == row.key and sp.grid == (lr, T))
            summary = json.loads(sp.done_path.read_text(encoding="utf-8"))
            table.append({"lr": lr, "T": T, "heldout_top1": summary["last_top1"], "run": sp.name})
        best = max(table, key=lambda e: e["heldout_top1"])  # max keeps the first of equals
        out[row.key] = {"lr": best["lr"], "T": best["T"], "table": table}
    return out


def plan_students(out: Path, paths: DataPaths, s: Settings, regimes: dict[str, dict], chosen: dict[str, dict]) -> list[RunSpec]:
    """Phase 2: every regime x row x seed with the row's chosen values."""
    specs = []
    for regime, info in regimes.items():
        weights = out / "runs" / f"{regime}-teacher" / "last.pt"
        for seed in range(s.seeds):
            store = f"{regime}-store-s{seed}"
            for row in s.chosen_rows:
                c = chosen[row.key]
                cfg = run_config(s, regime_data(paths, regime), regime, row.key, seed, s.epochs[regime], c["lr"], c["T"],
                                 teacher_weights=weights if row.distilled else None,
                                 soft_labels=out / "stores" / store if row.distilled else None)
                specs.append(_spec(out, f"{regime}-{row.key}-s{seed}", regime, row.key, seed, cfg,
                                   [store] if row.distilled else [], info["train_images"], info["val_images"]))
    return specs


def write_configs(specs: list[RunSpec]) -> None:
    from wsld.files import atomic_write_text
    from wsld.config import to_yaml

    for sp in specs:
        sp.config_path.parent.mkdir(parents=True, exist_ok=True)
        if sp.row == "teacher":
            what = "the teacher (CE)"
        elif sp.is_store:
            what = f"the soft-label store of seed {sp.seed} (run with: wsld {' '.join(sp.argv('fresh'))})"
        elif sp.regime == "search":
            what = f"search run of {sp.row} at lr {sp.grid[0]:g}, T {sp.grid[1]} (val = held-out training images)"
        else:
            what = f"the student with {sp.row}, seed {sp.seed}"
        header = (f"# wsld demo, {sp.regime}: {what}. Written by `wsld demo`; rerun by hand with\n"
                  f"#   wsld train {sp.config_path} --out RUN_DIR\n")  # fmt: skip
        if sp.deps:
            header += f"# (needs the output of the run {sp.deps[0]}, configs/{sp.deps[0]}.yaml)\n"
        atomic_write_text(sp.config_path, header + to_yaml(sp.config))


def run_state(sp: RunSpec) -> str:
    """``done``, ``resume`` or ``fresh``; refuses a run directory that holds a run of other settings
    (the demo would otherwise mix old and new numbers)."""
    from wsld.config import load_config, to_dict
    from wsld.engine.rundir import RESUME_SAFE_KEYS, config_diff

    if sp.is_store:
        return "done" if sp.done_path.is_file() else ("resume" if sp.run_dir.exists() else "fresh")
    saved = sp.run_dir / "config.yaml"
    has_ckpt = (sp.run_dir / "last.pt").is_file()
    done = sp.done_path.is_file()
    if not (has_ckpt or done):
        return "fresh"
    if saved.is_file():
        diff = [k for k in config_diff(to_dict(load_config(saved)), to_dict(sp.config)) if k not in RESUME_SAFE_KEYS]
        if diff:
            raise UserError(
                f"{sp.run_dir} holds a run made with other settings ({', '.join(diff[:4])}): give the demo another "
                f"--out, or the same options as before (e.g. --quick, --epochs, --limit-per-class)"
            )
    return "done" if done else "resume"
