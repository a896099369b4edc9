"""The runs of ``wsld compare``: its rows, settings, every run's config (teacher, soft-label store, search, final) and the run folder's state."""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from wsld.demo.search import Dim, Point
from wsld.errors import UserError


@dataclass(frozen=True)
class Row:
    """One row of the table: a loss, its fixed parameters and the parameter searched besides lr (and T)."""

    key: str  # run-name part and results key
    name: str  # the row's name in the tables
    loss: str  # distill.loss
    params: dict = field(default_factory=dict)  # fixed values in distill.params.<loss>
    weight: Optional[str] = None  # the loss parameter searched (None: none)
    complement: bool = False  # search 1 - weight on the log grid (KD's alpha in [0, 1])
    like: Optional[str] = None  # take the start values of this row's loss section (wsld_w1: wsld's)

    @property
    def distilled(self) -> bool:
        return self.loss != "ce"


ROWS = (  # every row compare can run, in table order
    Row("ce", "student alone (CE)", "ce"),
    Row("kd", "KD", "kd", weight="alpha", complement=True),
    Row("wsld", "WSLD", "wsld", {"weighting": "on"}, weight="alpha"),
    Row("wsld_w1", "WSLD, weights fixed at 1", "wsld", {"weighting": "off"}, weight="alpha", like="wsld"),
    Row("dkd", "DKD", "dkd", weight="beta"),
    Row("dist", "DIST", "dist", weight="weight"),
)
ROW_BY_KEY = {r.key: r for r in ROWS}
DEFAULT_ROWS = ("ce", "kd", "wsld", "wsld_w1")
SHORT_NAMES = {"teacher": "teacher", "ce": "CE", "kd": "KD", "wsld": "WSLD", "wsld_w1": "WSLD (w = 1)", "dkd": "DKD",
               "dist": "DIST"}  # fmt: skip
COLORS = {"teacher": "#555555", "ce": "#1f77b4", "kd": "#ff7f0e", "wsld": "#2ca02c", "wsld_w1": "#9467bd",
          "dkd": "#d62728", "dist": "#8c564b"}  # fmt: skip
DKD_WARMUP_SHARE = 20 / 240  # DKD's CIFAR-100 warm-up (20 of 240 epochs), kept as a share of the run
STORE_LIMIT_BYTES = 2 * 1024**3  # an exact soft-label store above this: the teacher runs online instead
SEARCH_SEED = 0


@dataclass
class Settings:
    """Everything that shapes a comparison's runs (recorded in OUT/compare.json; jobs/threads/progress are not)."""

    config: Optional[str]  # the base config file (None: the built-in defaults)
    overrides: tuple[str, ...] = ()
    rows: tuple[str, ...] = DEFAULT_ROWS
    seeds: int = 3
    epochs: Optional[int] = None  # student epochs (None: the config's train.epochs)
    teacher_epochs: Optional[int] = None  # teacher epochs (None: the config's teacher_train.epochs)
    budget: float = 1.0  # multiplies every run's epochs
    holdout: float = 0.1  # share of each class's training images held out for every choice
    limit: int = 3  # points a dimension's grid may add beyond its first three
    search: bool = True  # False: --no-search (the config's and the losses' published values)
    jobs: int = 1
    threads: int = 1

    def identity(self) -> dict[str, Any]:
        """What must match for an existing run folder to be continued."""
        return {"config": self.config, "overrides": list(self.overrides), "rows": list(self.rows), "seeds": self.seeds,
                "epochs": self.epochs, "teacher_epochs": self.teacher_epochs, "budget": self.budget,
                "holdout": self.holdout, "limit": self.limit, "search": self.search}  # fmt: skip

    @property
    def chosen_rows(self) -> tuple[Row, ...]:
        return tuple(ROW_BY_KEY[k] for k in self.rows)


@dataclass
class RunSpec:
    """One planned process: a ``wsld train`` run (teacher, search or final student) or a ``wsld soft-labels`` store."""

    name: str
    phase: str  # "search" or "final"
    row: str  # "teacher", "store" or a Row key
    seed: int
    config: Any  # wsld.config.Config
    config_path: Path
    run_dir: Path
    log_path: Path
    deps: list[str] = field(default_factory=list)
    cost: float = 1.0  # CPU seconds (estimated), for the progress bar's ETA
    steps_total: int = 1
    crops: int = 0  # stores: crops per image
    point: Optional[Point] = None  # search runs: the values tried
    what: str = ""  # one line for the config file's header
    crops_topk: int = 10  # stores: classes stored per crop (all of them: exact)
    @property
    def is_store(self) -> bool:
        return self.row == "store"

    @property
    def done_path(self) -> Path:
        return self.run_dir.with_name(self.run_dir.name + ".done") if self.is_store else self.run_dir / "summary.json"

    def argv(self, state: str) -> list[str]:
        """The ``wsld`` arguments of this run (progress bars off: compare shows its own)."""
        if self.is_store:
            classes = self.crops_topk
            return ["soft-labels", str(self.config_path), "--crops", str(self.crops), "--topk", str(classes),
                    "--precision", "float32", "--out", str(self.run_dir)]  # fmt: skip
        if state == "resume":
            return ["train", str(self.config_path), "--resume", str(self.run_dir), "train.progress=false"]
        return ["train", str(self.config_path), "--out", str(self.run_dir), "train.progress=false"]


def scaled(epochs: int, budget: float) -> int:
    return max(1, int(round(epochs * budget)))


def student_epochs(base: Any, s: Settings) -> int:
    return scaled(s.epochs if s.epochs is not None else base.train.epochs, s.budget)


def teacher_epochs(base: Any, s: Settings) -> int:
    return scaled(s.teacher_epochs if s.teacher_epochs is not None else base.teacher_train.epochs, s.budget)


def start_values(base: Any, row: Row) -> dict[str, float]:
    """A row's values before any search: lr and T from the config, the loss's parameters from the
    config's section for that loss if it has one, else the loss's published defaults."""
    from wsld.losses.registry import resolve_loss_params

    values = {"lr": float(base.train.lr)}
    if row.distilled:
        values["T"] = float(base.distill.T)
        section = (base.distill.params or {}).get(row.like or row.loss)
        params = resolve_loss_params(row.loss, {row.loss: dict(section or {})})[row.loss]
        if row.weight:
            values[row.weight] = float(params[row.weight])
    return values


def row_dims(base: Any, row: Row) -> tuple[Dim, ...]:
    """The searched dimensions of a row, in search order: lr, then T and the loss's weight."""
    v = start_values(base, row)
    dims = [Dim("lr", v["lr"], 2.0, low=0.0)]
    if row.distilled:
        dims.append(Dim("T", v["T"], 2.0, low=0.0))
        if row.weight:
            dims.append(Dim(row.weight, v[row.weight], 2.0, low=0.0, complement=row.complement))
    return tuple(dims)


def teacher_dims(base: Any) -> tuple[Dim, ...]:
    return (Dim("lr", float(base.teacher_train.lr), 2.0, low=0.0),)


def _validated(d: dict) -> Any:
    from wsld.config import config_from_dict, validate

    cfg = config_from_dict(d)
    validate(cfg)
    return cfg


def teacher_config(base: Any, s: Settings, lr: float, holdout: float) -> Any:
    """The teacher as its own CE run: the config's teacher model, teacher_train recipe, seed 0."""
    from wsld.config import to_dict

    d = copy.deepcopy(to_dict(base))
    d["model"].update(student=base.model.teacher, student_weights=None, teacher_weights=None)
    d["distill"].update(loss="ce", params={}, soft_labels=None)
    d["data"]["holdout"] = holdout
    tt = base.teacher_train
    d["train"].update(epochs=teacher_epochs(base, s), lr=lr, weight_decay=tt.weight_decay, schedule=tt.schedule,
                      seed=SEARCH_SEED)  # fmt: skip
    return _validated(d)


def student_config(base: Any, s: Settings, row: Row, values: dict[str, float], seed: int, holdout: float,
                   teacher: Optional[str], store: Optional[Path]) -> Any:
    """One row's run: the config with only the loss, its values, the seed and the split changed."""
    from wsld.config import to_dict
    from wsld.losses.registry import resolve_loss_params

    d = copy.deepcopy(to_dict(base))
    epochs = student_epochs(base, s)
    d["data"]["holdout"] = holdout
    d["train"].update(epochs=epochs, lr=values["lr"], seed=seed)
    if row.distilled:
        section = dict((base.distill.params or {}).get(row.like or row.loss) or {})
        section.update(row.params)
        if row.weight:
            section[row.weight] = values[row.weight]
        if row.loss == "dkd" and base.distill.loss != "dkd":
            section["warmup_epochs"] = round(DKD_WARMUP_SHARE * epochs, 4)
        d["distill"].update(loss=row.loss, T=values["T"], params=resolve_loss_params(row.loss, {row.loss: section}),
                            soft_labels=str(store) if store else None)  # fmt: skip
        d["model"]["teacher_weights"] = teacher
    else:
        d["distill"].update(loss="ce", params={}, soft_labels=None)
    return _validated(d)


def store_config(student_cfg: Any) -> Any:
    """A soft-label store's config: the student run's (same data, split, seed and crops), no store."""
    from wsld.config import to_dict

    d = copy.deepcopy(to_dict(student_cfg))
    d["distill"]["soft_labels"] = None
    return _validated(d)


def split_sizes(base: Any, holdout: float) -> tuple[list[int], int]:
    """Training images per class and the val size, as the engine sees them for ``data.holdout=holdout``."""
    from wsld.data.build import build_datasets

    data = copy.deepcopy(base.data)
    data.holdout = holdout
    train, val, info = build_datasets(data, seed=0)
    counts = [0] * info.num_classes
    for y in train.targets:
        counts[y] += 1
    return counts, len(val)


def use_store(classes: int, images: int, crops: int) -> bool:
    """Exact stores (every class, float32) when small enough; otherwise the teacher runs in every step."""
    return classes * 4 * images * crops <= STORE_LIMIT_BYTES


def write_config(sp: RunSpec, command: str) -> None:
    """``OUT/configs/<run>.yaml`` with a header saying what it is and how to rerun it by hand."""
    from wsld.config import to_yaml
    from wsld.files import atomic_write_text

    sp.config_path.parent.mkdir(parents=True, exist_ok=True)
    header = f"# {command}: {sp.what}. Rerun by hand with\n#   wsld {' '.join(sp.argv('fresh'))}\n"
    if sp.deps:
        header += f"# (needs the output of {', '.join(sp.deps)}: configs/{sp.deps[0]}.yaml)\n"
    text = header + to_yaml(sp.config)
    if not sp.config_path.is_file() or sp.config_path.read_text(encoding="utf-8") != text:
        atomic_write_text(sp.config_path, text)


def run_state(sp: RunSpec, clear_hint: str) -> str:
    """``done``, ``resume`` or ``fresh``; refuses a run directory that holds a run of other settings."""
    from wsld.config import load_config, to_dict
    from wsld.engine.rundir import RESUME_SAFE_KEYS, config_diff

    if sp.is_store:
        return "done" if sp.done_path.is_file() else ("resume" if sp.run_dir.exists() else "fresh")
    saved = sp.run_dir / "config.yaml"
    done = sp.done_path.is_file()
    if not ((sp.run_dir / "last.pt").is_file() or done):
        return "fresh"
    if saved.is_file():
        diff = [k for k in config_diff(to_dict(load_config(saved)), to_dict(sp.config)) if k not in RESUME_SAFE_KEYS]
        if diff:
            raise UserError(f"{sp.run_dir} holds a run made with other settings ({', '.join(diff[:4])}): {clear_hint}")
    return "done" if done else "resume"


def read_summary(sp: RunSpec) -> dict:
    return json.loads(sp.done_path.read_text(encoding="utf-8"))
