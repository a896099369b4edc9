"""The loss registry: specs agree with their functions, parameters are checked with one line naming the key."""

import subprocess
import sys

import pytest
import torch

from wsld.config import load_config
from wsld.errors import UserError
from wsld.losses.registry import LOSSES, DistillLoss, LossSpec, Param, build_loss, get_loss, loss_param_defaults


def _batch(n=6, c=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, c, generator=g), torch.randn(n, c, generator=g), torch.randint(0, c, (n,), generator=g)


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_every_loss_returns_exactly_its_declared_parts(name):
    s, t, y = _batch()
    m = DistillLoss(name, 2.0, 0.5)
    loss, parts = m(s, None if not m.needs_teacher else t, y)
    assert loss.ndim == 0
    scalars = {k for k, v in parts.items() if v.ndim == 0}
    assert scalars == set(m.part_names)
    assert ("sample_weight" in parts) == LOSSES[name].per_sample_weight
    assert all(k in m.part_names or k == "sample_weight" for k in parts)
    assert not any(v.requires_grad for v in parts.values())


def test_only_ce_runs_without_a_teacher():
    assert [n for n, spec in LOSSES.items() if not spec.needs_teacher] == ["ce"]
    s, _, y = _batch()
    assert DistillLoss("ce")(s, None, y)[0].item() == pytest.approx(torch.nn.functional.cross_entropy(s, y).item())


def test_defaults_are_the_published_values():
    assert loss_param_defaults("wsld") == {"alpha": 2.5, "weighting": "on"}  # ImageNet
    assert loss_param_defaults("dkd") == {"alpha": 1.0, "beta": 8.0, "ce_weight": 1.0, "warmup_epochs": 20.0}  # CIFAR-100
    assert loss_param_defaults("dist") == {"beta": 1.0, "gamma": 1.0, "weight": 2.0}  # ResNet-34 -> ResNet-18
    assert loss_param_defaults("kd") == {"alpha": 0.9}
    assert loss_param_defaults("ce") == {}


def test_positional_construction_and_bound_parameters():
    m = DistillLoss("wsld", 2.0, 2.5)
    assert (m.T, m.alpha, m.params) == (2.0, 2.5, {"alpha": 2.5, "weighting": "on"})
    assert DistillLoss("dist", 1.0, 0.0, gamma=3).params == {"beta": 1.0, "gamma": 3.0, "weight": 2.0}
    assert DistillLoss("wsld", weighting=False).params == {"alpha": 2.5, "weighting": "off"}  # YAML's reading of `off`


@pytest.mark.parametrize(
    "name, params, words",
    [
        ("dkd", {"betta": 1.0}, ["distill.params.dkd.betta", "dkd", "alpha, beta, ce_weight, warmup_epochs"]),
        ("ce", {"beta": 1.0}, ["distill.params.ce.beta", "ce", "none"]),
        ("dkd", {"beta": -1.0}, ["distill.params.dkd.beta", ">= 0", "-1.0"]),
        ("dkd", {"warmup_epochs": float("nan")}, ["distill.params.dkd.warmup_epochs", "finite"]),
        ("dist", {"weight": "heavy"}, ["distill.params.dist.weight", "finite number", "'heavy'"]),
        ("dist", {"gamma": True}, ["distill.params.dist.gamma", "finite number"]),
        ("wsld", {"weighting": "sometimes"}, ["distill.params.wsld.weighting", "one of on, off", "'sometimes'"]),
        ("wsld", {"weighting": 1.0}, ["distill.params.wsld.weighting", "one of on, off"]),
        ("kd", {"alpha": 2.5}, ["distill.params.kd.alpha", "<= 1", "2.5"]),
    ],
)
def test_bad_parameters_are_one_line_naming_the_key(name, params, words):
    with pytest.raises(UserError) as e:
        DistillLoss(name, **params)
    line = str(e.value)
    assert "\n" not in line
    for w in words:
        assert w in line, (w, line)


def test_unknown_loss_names_the_choices():
    with pytest.raises(UserError, match="choose one of ce, dist, dkd, kd, wsld"):
        get_loss("crd")


def test_build_loss_from_config_with_params():
    cfg = load_config(None, ["distill.loss=dkd", "distill.T=1", "distill.alpha=0.5", "distill.params={beta: 0.5, warmup_epochs: 1}"])
    m = build_loss(cfg.distill)
    assert (m.name, m.T, m.alpha) == ("dkd", 1.0, 0.5)
    assert m.params == {"alpha": 0.5, "beta": 0.5, "ce_weight": 1.0, "warmup_epochs": 1.0}
    off = build_loss(load_config(None, ["distill.params.weighting=off"]).distill)
    s, t, y = _batch()
    assert torch.equal(off(s, t, y)[1]["sample_weight"], torch.ones(6))


@pytest.mark.parametrize(
    "overrides, words",
    [
        (["distill.loss=dkd", "distill.params.gamma=1"], ["distill.params.gamma", "dkd"]),
        (["distill.loss=dist", "distill.params.beta=-2"], ["distill.params.beta", ">= 0"]),
        (["distill.params.weighting=maybe"], ["distill.params.weighting", "on, off"]),
        (["distill.loss=dkd", "distill.params.beta={a: 1}"], ["distill.params.beta"]),
    ],
)
def test_config_refuses_bad_params_naming_the_key(overrides, words):
    with pytest.raises(UserError) as e:
        load_config(None, overrides)
    for w in words:
        assert w in str(e.value), (w, str(e.value))


def test_config_keeps_params_as_given_in_canonical_types(tmp_path):
    """YAML `off` (a boolean) becomes the word; the older flat form lands in the chosen loss's
    section, which is filled with its defaults; other sections are kept as given."""
    f = tmp_path / "c.yaml"
    f.write_text("distill:\n  loss: dkd\n  params:\n    beta: 8\n    kd: {alpha: 0.5}\n")
    assert load_config(f).distill.params == {"dkd": {"alpha": 1.0, "beta": 8.0, "ce_weight": 1.0, "warmup_epochs": 20.0}, "kd": {"alpha": 0.5}}
    assert load_config(None, ["distill.params.weighting=off"]).distill.params == {"wsld": {"alpha": 2.5, "weighting": "off"}}
    assert load_config(None).distill.params == {"wsld": {"alpha": 2.5, "weighting": "on"}}


def test_switching_loss_never_trips_on_another_loss_alpha(tmp_path):
    """A WSLD config (alpha 2.5) run with distill.loss=kd uses kd's own section or kd's default, not 2.5."""
    f = tmp_path / "c.yaml"
    f.write_text("distill:\n  loss: wsld\n  params:\n    wsld: {alpha: 2.5}\n    kd: {alpha: 0.7}\n")
    assert build_loss(load_config(f, ["distill.loss=kd"]).distill).alpha == 0.7
    assert build_loss(load_config(f).distill).alpha == 2.5
    g = tmp_path / "g.yaml"
    g.write_text("distill:\n  loss: wsld\n  params:\n    wsld: {alpha: 2.5}\n")
    assert build_loss(load_config(g, ["distill.loss=kd"]).distill).alpha == 0.9  # kd's default
    assert build_loss(load_config(g, ["distill.loss=dist"]).distill).alpha is None


def test_older_distill_alpha_still_reads_for_the_chosen_loss():
    assert build_loss(load_config(None, ["distill.alpha=2.25"]).distill).alpha == 2.25
    assert build_loss(load_config(None, ["distill.loss=ce", "distill.alpha=2.25"]).distill).alpha is None  # ce has none
    with pytest.raises(UserError, match="distill.alpha.*distill.params.wsld.alpha.*keep one"):
        load_config(None, ["distill.alpha=2.25", "distill.params.wsld.alpha=3"])


def test_epoch_reaches_only_functions_that_declare_it(monkeypatch):
    seen = []

    def with_epoch(s, t, y, *, T, epoch):
        seen.append((T, epoch))
        return s.sum(), {}

    def without(s, t, y, *, label_smoothing):
        return s.sum() * (1 - label_smoothing), {}

    monkeypatch.setitem(LOSSES, "probe_e", LossSpec("probe_e", with_epoch, needs_teacher=False, parts=()))
    monkeypatch.setitem(LOSSES, "probe_a", LossSpec("probe_a", without, needs_teacher=False, parts=()))
    m = DistillLoss("probe_e", T=3.0)
    m(torch.ones(1, 2), None, torch.zeros(1, dtype=torch.long))
    m.set_epoch(2.5)
    m(torch.ones(1, 2), None, torch.zeros(1, dtype=torch.long))
    assert seen == [(3.0, 0.0), (3.0, 2.5)]
    p = DistillLoss("probe_a", label_smoothing=0.0)
    p.set_epoch(4.0)  # accepted, not passed: `without` would raise a TypeError
    assert p(torch.ones(1, 2), None, torch.zeros(1, dtype=torch.long))[0].item() == 2.0


def test_a_spec_that_disagrees_with_its_function_fails_at_definition():
    def fn(s, t, y, *, beta: float = 2.0):
        return s.sum(), {}

    with pytest.raises(TypeError, match="beta"):
        LossSpec("x", fn, needs_teacher=True, parts=(), params=(Param("beta", 1.0, "m", low=0.0),))
    with pytest.raises(TypeError, match="gamma"):
        LossSpec("x", fn, needs_teacher=True, parts=(), params=(Param("gamma", 1.0, "m"),))


def test_importing_one_loss_imports_no_other():
    code = "import sys, wsld.losses.dkd; print(sorted(m for m in sys.modules if m.startswith('wsld')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "['wsld', 'wsld.losses', 'wsld.losses.dkd']"
