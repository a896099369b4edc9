"""The loss registry: ``LOSSES`` names each method's ``LossSpec``; ``DistillLoss`` binds one to its hyper-parameters.

A method is a pure function ``(student_logits, teacher_logits, target, **hyper) -> (loss, parts)``.
It names in its signature which of the shared config values it reads (``T``, ``label_smoothing``,
from ``distill.*``), its own parameters (``distill.params.<loss>.*``, declared in its spec with
default, allowed values and meaning; ``alpha`` is one of them, since it means something different
for each loss) and, if it needs the training progress, ``epoch`` (set through ``DistillLoss.set_epoch``). ``parts`` holds detached tensors: the 0-dim ones named in
``LossSpec.parts`` are logged as epoch means; a 1-dim ``sample_weight`` is the per-sample weight.
Nothing here calls ``.item()``, so a step never waits on the GPU.

Adding a loss: one file with its function, one ``LossSpec`` entry in ``LOSSES`` (docs/method.md).
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional

from torch import Tensor, nn

from wsld.errors import UserError
from wsld.losses.ce import ce
from wsld.losses.dist import dist
from wsld.losses.dkd import dkd
from wsld.losses.kd import kd
from wsld.losses.wsld import wsld

LossParts = dict[str, Tensor]
LossFn = Callable[..., tuple[Tensor, LossParts]]

SHARED = ("T", "label_smoothing")  # distill.* values a function may name in its signature
EPOCH = "epoch"  # a function naming it receives the training progress in (fractional) epochs


@dataclass(frozen=True)
class Param:
    """One hyper-parameter of a loss (``distill.params.<loss>.<name>``): a number in a range, or one of a few words."""

    name: str
    default: Any
    meaning: str
    low: Optional[float] = None  # numbers: bounds, inclusive unless *_open
    high: Optional[float] = None
    low_open: bool = False
    high_open: bool = False
    choices: tuple[str, ...] = ()  # words: the allowed values

    @property
    def allowed(self) -> str:
        """The allowed values in words, for error messages and docs."""
        if self.choices:
            return "one of " + ", ".join(self.choices)
        bounds = []
        if self.low is not None:
            bounds.append(f"{'>' if self.low_open else '>='} {self.low:g}")
        if self.high is not None:
            bounds.append(f"{'<' if self.high_open else '<='} {self.high:g}")
        return "a finite number" + (" " + " and ".join(bounds) if bounds else "")

    def coerce(self, value: Any) -> Any:
        """``value`` in its canonical type (float, or the word), or ValueError when it is not allowed.

        YAML reads ``on``/``off`` as booleans, so a word parameter takes True/False for on/off.
        """
        if self.choices:
            if isinstance(value, bool) and {"on", "off"} <= set(self.choices):
                value = "on" if value else "off"
            if not isinstance(value, str) or value not in self.choices:
                raise ValueError
            return value
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError
        v = float(value)
        if self.low is not None and (v < self.low or (self.low_open and v == self.low)):
            raise ValueError
        if self.high is not None and (v > self.high or (self.high_open and v == self.high)):
            raise ValueError
        return v


@dataclass(frozen=True)
class LossSpec:
    """A registered method: its function, whether it runs a teacher, its parameters and logged parts."""

    name: str
    fn: LossFn
    needs_teacher: bool
    parts: tuple[str, ...]  # names of the 0-dim parts the engine logs
    params: tuple[Param, ...] = ()
    per_sample_weight: bool = False  # parts also hold a 1-dim ``sample_weight``

    def __post_init__(self) -> None:
        # a spec that disagrees with its function is a programming error: fail at import, not mid-run
        sig = inspect.signature(self.fn).parameters
        if "alpha" in sig and "alpha" not in {p.name for p in self.params}:
            raise TypeError(f"loss {self.name}: declare 'alpha' as a Param (its meaning and range are the loss's own)")
        for p in self.params:
            if p.name not in sig or p.name in SHARED or p.name == EPOCH:
                raise TypeError(f"loss {self.name}: '{p.name}' must be a keyword of {self.fn.__name__} other than {SHARED + (EPOCH,)}")
            if sig[p.name].default is not inspect.Parameter.empty and sig[p.name].default != p.default:
                raise TypeError(f"loss {self.name}: '{p.name}' defaults to {p.default!r} here, {sig[p.name].default!r} in the function")

    @property
    def shared(self) -> tuple[str, ...]:
        """The ``distill.*`` values (T, label_smoothing) the function reads."""
        sig = inspect.signature(self.fn).parameters
        return tuple(k for k in SHARED if k in sig)

    @property
    def wants_epoch(self) -> bool:
        return EPOCH in inspect.signature(self.fn).parameters

    def defaults(self) -> dict[str, Any]:
        return {p.name: p.default for p in self.params}

    def check_params(self, params: Mapping[str, Any], key: Optional[str] = None) -> dict[str, Any]:
        """The given parameters in canonical types (not filled with defaults); UserError naming the key otherwise."""
        key = key or f"distill.params.{self.name}"
        by_name = {p.name: p for p in self.params}
        out: dict[str, Any] = {}
        for name, value in params.items():
            if name not in by_name:
                known = ", ".join(sorted(by_name)) if by_name else "none"
                raise UserError(f"config key '{key}.{name}': not a parameter of loss {self.name} (its parameters: {known})")
            p = by_name[name]
            try:
                out[name] = p.coerce(value)
            except ValueError:
                raise UserError(f"config key '{key}.{name}': must be {p.allowed} for loss {self.name}, got {value!r}") from None
        return out


LOSSES: dict[str, LossSpec] = {
    s.name: s
    for s in (
        LossSpec("ce", ce, needs_teacher=False, parts=("hard", "soft", "soft_kl", "weight_mean")),
        LossSpec("kd", kd, needs_teacher=True, parts=("hard", "soft", "soft_kl", "weight_mean"), params=(
            Param("alpha", 0.9, "mixing weight: (1 - alpha) * CE + alpha * T^2 * KL", low=0.0, high=1.0),
        )),
        LossSpec("wsld", wsld, needs_teacher=True, parts=("hard", "soft", "soft_kl", "weight_mean"), per_sample_weight=True, params=(
            Param("alpha", 2.5, "weight of the soft term (reference: 2.5 ImageNet, 2.25 CIFAR-100)", low=0.0),
            Param("weighting", "on", "on: the per-sample weight w_i; off: every w_i = 1 (ablation)", choices=("on", "off")),
        )),
        LossSpec("dkd", dkd, needs_teacher=True, parts=("hard", "tckd", "nckd"), params=(
            Param("alpha", 1.0, "weight of the target-class term TCKD (1 CIFAR-100, 0.5 ImageNet)", low=0.0),
            Param("beta", 8.0, "weight of the non-target term NCKD", low=0.0),
            Param("ce_weight", 1.0, "weight of the cross-entropy term", low=0.0),
            Param("warmup_epochs", 20.0, "epochs over which the TCKD + NCKD term ramps up from 0", low=0.0),
        )),
        LossSpec("dist", dist, needs_teacher=True, parts=("hard", "inter", "intra"), params=(
            Param("beta", 1.0, "weight of the inter-class (per-sample) relation term", low=0.0),
            Param("gamma", 1.0, "weight of the intra-class (per-class, over the batch) relation term", low=0.0),
            Param("weight", 2.0, "weight of the whole relation term against CE", low=0.0),
        )),
    )
}  # fmt: skip


def get_loss(name: str) -> LossSpec:
    if name not in LOSSES:
        raise UserError(f"unknown loss '{name}': choose one of {', '.join(sorted(LOSSES))}")
    return LOSSES[name]


def loss_param_defaults(name: str) -> dict[str, Any]:
    """``distill.params.<name>`` defaults of loss ``name`` (what an empty section means)."""
    return get_loss(name).defaults()


class DistillLoss(nn.Module):
    """A registered loss with its hyper-parameters bound; ``set_epoch`` feeds losses that follow the training progress."""

    def __init__(self, name: str, T: float = 4.0, alpha: Optional[float] = None, label_smoothing: float = 0.0, **params: Any):
        """``alpha`` is shorthand for ``params["alpha"]``, ignored by a loss that has none (ce, dist)."""
        super().__init__()
        self.spec = get_loss(name)
        self.name = name
        self.T, self.label_smoothing = float(T), float(label_smoothing)
        if alpha is not None and "alpha" not in params and any(p.name == "alpha" for p in self.spec.params):
            params["alpha"] = alpha
        self.params = {**self.spec.defaults(), **self.spec.check_params(params)}
        shared = {"T": self.T, "label_smoothing": self.label_smoothing}
        self._kwargs = {**{k: shared[k] for k in self.spec.shared}, **self.params}
        self._wants_epoch = self.spec.wants_epoch
        self.epoch = 0.0

    @property
    def alpha(self) -> Optional[float]:
        """The loss's own ``alpha`` (None for a loss without one)."""
        return self.params.get("alpha")

    @property
    def needs_teacher(self) -> bool:
        return self.spec.needs_teacher

    @property
    def part_names(self) -> tuple[str, ...]:
        return self.spec.parts

    def set_epoch(self, epoch: float) -> None:
        """Training progress in (fractional) epochs, e.g. ``epoch + step / steps_per_epoch``; call before each step."""
        self.epoch = float(epoch)

    def forward(self, student_logits: Tensor, teacher_logits: Optional[Tensor], target: Tensor) -> tuple[Tensor, LossParts]:
        extra = {EPOCH: self.epoch} if self._wants_epoch else {}
        return self.spec.fn(student_logits, teacher_logits, target, **self._kwargs, **extra)

    def extra_repr(self) -> str:
        bound = ", ".join(f"{k}={v}" for k, v in self._kwargs.items())
        return f"{self.name}, {bound}" if bound else self.name


def resolve_loss_params(loss: str, params: Mapping[str, Any], legacy_alpha: Optional[float] = None) -> dict[str, dict[str, Any]]:
    """``distill.params`` as one checked section per loss: ``{loss_name: {param: value}}``.

    Each loss reads only its own section, so a config can carry ``wsld: {alpha: 2.5}`` and
    ``kd: {alpha: 0.9}`` and switching ``distill.loss`` never trips on the other loss's values.
    Two older spellings still work for the chosen loss: flat keys (``distill.params.weighting=off``)
    and ``distill.alpha``. Every section is checked against its loss's spec; the chosen loss's
    section is filled with its defaults, so a run's resolved config records every value it used.
    """
    spec = get_loss(loss)
    sections: dict[str, dict[str, Any]] = {}
    flat: dict[str, Any] = {}
    for name, value in dict(params or {}).items():
        if name in LOSSES:
            if value is None:
                value = {}
            if not isinstance(value, Mapping):
                raise UserError(f"config key 'distill.params.{name}': must be a mapping of loss {name}'s parameters, got {value!r}")
            sections[name] = LOSSES[name].check_params(dict(value))
        else:
            flat[name] = value
    mine = {**sections.get(loss, {}), **spec.check_params(flat, key="distill.params")}
    if legacy_alpha is not None and any(p.name == "alpha" for p in spec.params):
        alpha = spec.check_params({"alpha": legacy_alpha}, key="distill")["alpha"]
        if "alpha" in mine and mine["alpha"] != alpha:
            raise UserError(f"config keys 'distill.alpha' ({legacy_alpha}) and 'distill.params.{loss}.alpha' ({mine['alpha']}) "
                            f"disagree: distill.alpha is the older spelling, keep one")
        mine["alpha"] = alpha
    sections[loss] = {**spec.defaults(), **mine}
    return sections


def build_loss(distill_cfg: Any) -> DistillLoss:
    """The loss a ``config.DistillConfig`` describes: ``loss``, ``T``, ``label_smoothing`` and its ``params`` section."""
    sections = resolve_loss_params(distill_cfg.loss, distill_cfg.params, getattr(distill_cfg, "alpha", None))
    return DistillLoss(distill_cfg.loss, distill_cfg.T, label_smoothing=distill_cfg.label_smoothing, **sections[distill_cfg.loss])
