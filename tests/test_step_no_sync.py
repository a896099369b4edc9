"""No host sync in a steady-state step: the non-finite guard decided on the device, exact, and read once per log window."""

from __future__ import annotations

import copy
import sys

import pytest
import torch
from engine_helpers import digits_teacher, records, run_cli  # noqa: F401  (digits_teacher: the session fixture)
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from wsld.engine.step import APPLIED, GRADS_NOT_FINITE, LOSS_NOT_FINITE, STAND_IN, StepContext, train_step, update_ema
from wsld.losses.registry import DistillLoss

CE_TINY = [
    "data.dataset=digits", "data.batch_size=64", "data.workers=0", "train.progress=false", "train.epochs=1",
    "distill.loss=ce", "train.lr=0.025", "model.student=cnn_student",
]  # fmt: skip


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(64, 3))


@pytest.fixture
def device_verdict(monkeypatch):
    """The CUDA path's device-side verdict, taken on the CPU (the WSLD_TEST_DEVICE_VERDICT hook)."""
    monkeypatch.setenv("WSLD_TEST_DEVICE_VERDICT", "1")


def _ctx(model: nn.Module, check: bool = True, clip: float = 0.0) -> StepContext:
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    return StepContext(student=model, teacher=None, loss_fn=DistillLoss("ce"), optimizer=opt, check_finite=check, grad_clip=clip)


def _state(ctx: StepContext) -> list[torch.Tensor]:
    """Every tensor a step may change: parameters, BatchNorm statistics, momentum buffers."""
    m = ctx.student
    return [t.detach().clone() for t in (*m.parameters(), *m.buffers())] + [
        s["momentum_buffer"].clone() for s in ctx.optimizer.state.values() if s.get("momentum_buffer") is not None
    ]


def _batch(seed: int, bad: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(8, 1, 6, 6, generator=g)
    if bad:
        x[3, 0, 2, 2] = float("nan")
    return x, torch.randint(0, 3, (8,), generator=g)


@pytest.mark.parametrize("clip", [0.0, 1.0])
@pytest.mark.parametrize("on_device", [False, True])
def test_a_finite_step_is_the_plain_step_bit_for_bit(clip, on_device, monkeypatch):
    if on_device:
        monkeypatch.setenv("WSLD_TEST_DEVICE_VERDICT", "1")
    checked, plain = _ctx(_net(), clip=clip), _ctx(_net(), check=False, clip=clip)
    for k in range(4):  # the first decided on the host, the others on the device
        res = train_step(checked, *_batch(k))
        train_step(plain, *_batch(k))
        assert int(res.status) == APPLIED
        assert all(torch.equal(a, b) for a, b in zip(_state(checked), _state(plain)))


@pytest.mark.parametrize("clip", [0.0, 1.0])
def test_a_non_finite_step_changes_nothing_and_says_why(clip, device_verdict):
    ctx = _ctx(_net(), clip=clip)
    train_step(ctx, *_batch(0))  # the optimiser's state exists from here: device decisions
    assert ctx.guard.on_device(torch.device("cpu"))
    before = _state(ctx)
    res = train_step(ctx, *_batch(1, bad=True))
    assert res.skipped_on_host is None and int(res.status) == LOSS_NOT_FINITE and not torch.isfinite(res.loss)
    after = _state(ctx)
    assert all(torch.equal(a, b) for a, b in zip(before, after)), "a non-finite step moved the weights, BN stats or momentum"
    res = train_step(ctx, *_batch(2))  # and training goes on from there
    assert int(res.status) == APPLIED and not all(torch.equal(a, b) for a, b in zip(before, _state(ctx)))


def test_the_first_step_non_finite_is_decided_on_the_host_and_not_applied():
    ctx = _ctx(_net())
    before = _state(ctx)
    res = train_step(ctx, *_batch(0, bad=True))
    assert res.skipped_on_host is True and int(res.status) == LOSS_NOT_FINITE and not ctx.optimizer.state
    assert all(torch.equal(a, b) for a, b in zip(before, _state(ctx)))


def test_a_stand_in_step_is_discarded(device_verdict):
    ctx = _ctx(_net())
    train_step(ctx, *_batch(0))
    before = _state(ctx)
    res = train_step(ctx, torch.zeros(2, 1, 6, 6), torch.zeros(2, dtype=torch.int64), stand_in=True)
    assert int(res.status) == STAND_IN and all(torch.equal(a, b) for a, b in zip(before, _state(ctx)))


def test_update_ema_is_torchs_ema_and_skips_what_was_not_applied(device_verdict):
    model = _net()
    ctx = _ctx(model)
    ours = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.9), use_buffers=True)
    torchs = copy.deepcopy(ours)
    for k in range(3):
        res = train_step(ctx, *_batch(k))
        update_ema(ours, model, 0.9, res)
        torchs.update_parameters(model)
        assert all(torch.equal(a, b) for a, b in zip(ours.state_dict().values(), torchs.state_dict().values()))
    frozen = copy.deepcopy(ours.module.state_dict())
    res = train_step(ctx, *_batch(5, bad=True))
    update_ema(ours, model, 0.9, res)
    assert all(torch.equal(a, b) for a, b in zip(ours.module.state_dict().values(), frozen.values()))


ENGINE = ("/wsld/engine/",)
READS = ("item", "tolist", "__bool__", "__int__", "__float__", "numpy", "cpu")


def _count_host_reads(monkeypatch) -> tuple[list[int], dict]:
    """Patches the tensor methods that bring values to the host; records, for each call made by the
    engine's own code, how many steps had been taken then."""
    import wsld.engine.loop as loop

    seen = {"steps": 0}
    reads: list[int] = []
    real_step = loop.train_step

    def counting_step(*a, **kw):
        seen["steps"] += 1
        return real_step(*a, **kw)

    monkeypatch.setattr(loop, "train_step", counting_step)
    for name in READS:
        real = getattr(torch.Tensor, name)

        def wrapper(self, *a, __real=real, **kw):
            caller = sys._getframe(1).f_code.co_filename.replace("\\", "/")
            if any(p in caller for p in ENGINE) and not caller.endswith(("evaluate.py", "checkpoint.py")):
                reads.append(seen["steps"])
            return __real(self, *a, **kw)

        monkeypatch.setattr(torch.Tensor, name, wrapper)
    return reads, seen


@pytest.mark.parametrize("log_every", [7, 21])
def test_the_loop_reads_the_device_once_per_log_window(tmp_path, monkeypatch, log_every, device_verdict):
    # digits: 1,347 train images / 64 = 21 steps; reads while steps run (not at the epoch's end,
    # where eval and the checkpoint read): the first step's host decision, then one per window
    # (on a CPU the step reads its verdict at once, which costs nothing there: the hook takes CUDA's path)
    reads, seen = _count_host_reads(monkeypatch)
    rc, _, err = run_cli(["train", *CE_TINY, f"train.log_every={log_every}", "--out", str(tmp_path / "run")])
    assert rc == 0, err
    steps = seen["steps"]
    assert steps == 21
    during = [s for s in reads if s < steps]
    windows = steps // log_every - (steps % log_every == 0)  # windows that end before the last step
    # per window: the verdicts, then the metrics line's means; plus the first step
    assert len(during) <= 2 * windows + 1, during
    assert sum(1 for s in during if s == 1) <= 1


def test_divergence_is_found_at_the_window_end_and_never_saved(tmp_path, capsys):
    run = tmp_path / "run"
    rc, _, err = run_cli(["train", *CE_TINY, "train.lr=1e4", "train.log_every=5", "checkpoint.every_steps=0", "--out", str(run)])
    assert rc == 3, err
    line = [x for x in err.splitlines() if x.startswith("wsld: error:")][-1]
    assert "is not finite at epoch 1, step" in line and "no checkpoint was written yet" in line, line
    assert not (run / "last.pt").exists()
    diverged = [r for r in records(run) if r["kind"] == "diverged"]
    assert len(diverged) == 1 and diverged[0]["global_step"] <= 5  # lr=1e4 blows up within the first window
    assert not [r for r in records(run) if r["kind"] == "train"], "a metrics line was written over a diverged window"


def test_model_compile_trains_distils_soft_labels_and_evaluates(tmp_path, monkeypatch, digits_teacher):
    # torch.compile with the eager backend (the WSLD_COMPILE_BACKEND test hook): the tracing and the
    # compiled modules' wrappers are what broke; the default backend (inductor) is the same path
    monkeypatch.setenv("WSLD_COMPILE_BACKEND", "eager")
    common = [*CE_TINY, "distill.loss=wsld", "model.teacher=cnn_teacher", f"model.teacher_weights={digits_teacher}",
              "distill.T=4.0", "distill.alpha=2.25", "model.compile=true", "train.log_every=10"]  # fmt: skip
    rc, _, err = run_cli(["train", *common, "--out", str(tmp_path / "run")])
    assert rc == 0, err
    rc, _, err = run_cli(["soft-labels", *common, "--crops", "1", "--out", str(tmp_path / "store")])
    assert rc == 0, err
    rc, out, err = run_cli(["eval", str(tmp_path / "run" / "last.pt"), "model.compile=true"])
    assert rc == 0 and "top-1" in out, err



@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_steady_state_cuda_steps_never_sync():
    from wsld.engine.health import StepHealth
    from wsld.engine.stats import EpochStats

    dev = torch.device("cuda")
    model = _net().to(dev)
    ctx = _ctx(model)
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.9), use_buffers=True)
    stats, health = EpochStats(3, dev), StepHealth(10, False, dev)
    batches = [tuple(t.to(dev) for t in _batch(k, bad=k == 3)) for k in range(6)]
    update_ema(ema, model, 0.9, train_step(ctx, *batches[0]))  # the first step: its verdict is read on the host
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for k, (x, y) in enumerate(batches[1:]):
            res = train_step(ctx, x, y)
            stats.add(res.loss, res.parts, y, res.status == APPLIED)
            update_ema(ema, model, 0.9, res)
            health.record(res.status, 0, k, k)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    verdicts, _ = health.read()
    assert [(v.step, v.why) for v in verdicts] == [(2, "loss")]


def _ddp_worker(rank: int, port: int, out: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        model = _net()
        ctx = _ctx(nn.parallel.DistributedDataParallel(model))
        from wsld.engine.health import StepHealth

        health = StepHealth(10, True, torch.device("cpu"))
        statuses = []
        for k in range(4):
            x, y = _batch(10 * k + rank)
            if k == 1 and rank == 0:  # a non-finite loss on rank 0 only
                x, y = _batch(10 * k + rank, bad=True)
            stand_in = k == 2 and rank == 1  # rank 1's batch was empty: a stand-in runs
            if stand_in:
                x, y = torch.zeros(2, 1, 6, 6), torch.zeros(2, dtype=torch.int64)
            before = _state(ctx)
            res = train_step(ctx, x, y, stand_in=stand_in)
            health.record(res.status, 0, k, k)
            statuses.append(int(res.status))
            changed = not all(torch.equal(a, b) for a, b in zip(before, _state(ctx)))
            statuses.append(changed)
        verdicts, signum = health.read(15 if rank == 1 else None)  # and rank 1 got a SIGTERM
        torch.save({"statuses": statuses, "weights": [p.detach() for p in model.parameters()],
                    "verdicts": [(v.step, v.why) for v in verdicts], "signum": signum}, f"{out}.{rank}")  # fmt: skip
    finally:
        dist.destroy_process_group()


def test_under_ddp_every_rank_skips_a_step_that_one_rank_could_not_take(tmp_path):
    # no collective of the guard's own: a rank's non-finite loss (or its stand-in for an empty batch)
    # poisons its gradients, DDP's all-reduce spreads them, and both ranks leave the step out
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = str(tmp_path / "r")
    mp.spawn(_ddp_worker, args=(port, out), nprocs=2, join=True)
    r0, r1 = torch.load(f"{out}.0"), torch.load(f"{out}.1")
    # (status, weights changed) per step: kept; rank 0's non-finite loss; rank 1's stand-in; kept
    assert r0["statuses"] == [APPLIED, True, LOSS_NOT_FINITE, False, GRADS_NOT_FINITE, False, APPLIED, True]
    assert r1["statuses"] == [APPLIED, True, GRADS_NOT_FINITE, False, STAND_IN, False, APPLIED, True]
    assert all(torch.equal(a, b) for a, b in zip(r0["weights"], r1["weights"]))
    # one read, one all-reduce: every rank learns what happened where, and the stop signal
    for r in (r0, r1):
        assert r["verdicts"] == [(1, "loss"), (2, "empty")] and r["signum"] == 15
