"""The time ``wsld compare`` expects before it starts: a few timed steps of the real models on the real data, scaled to the planned runs."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

# a run's start-up (imports, data, model, checkpoints, summary): about 4-6 s of CPU as its own process on
# the 2-core machine, about 1-2 s when runs go one after another in one process (--jobs 1)
STARTUP_S = {"process": 5.0, "in_process": 1.5}


@dataclass
class Costs:
    """CPU seconds per image: training step (data + forward + backward + update) and evaluation, per model."""

    train: dict[str, float]
    eval: dict[str, float]
    data: float  # reading and augmenting one training image
    startup: float = STARTUP_S["process"]


def _time(fn, repeat: int) -> float:
    """CPU seconds per call (process time: what the call costs, whatever else the machine runs)."""
    fn()  # warm-up
    t0 = time.process_time()
    for _ in range(repeat):
        fn()
    return (time.process_time() - t0) / repeat


def measure(cfg: Any, models: list[str], batch: int = 32) -> Costs:
    """Times ``models`` on batches of this config's training images, on one thread, in CPU seconds."""
    import torch

    from wsld.data.build import build_datasets
    from wsld.models import build_model

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train, _val, info = build_datasets(cfg.data, seed=0)
        n = min(batch, len(train))
        keys = [(i, 0) for i in range(n)]
        t0 = time.process_time()
        samples = [train[k] for k in keys]
        data = (time.process_time() - t0) / n
        x = torch.stack([torch.as_tensor(s[0]) for s in samples]).float()
        y = torch.as_tensor([int(s[1]) for s in samples])
        out_train, out_eval = {}, {}
        for name in dict.fromkeys(models):
            model = build_model(name, info.num_classes, in_channels=info.in_channels)
            opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

            def step() -> None:
                opt.zero_grad(set_to_none=True)
                torch.nn.functional.cross_entropy(model(x), y).backward()
                opt.step()

            def forward() -> None:
                with torch.no_grad():
                    model(x)

            model.train()
            out_train[name] = _time(step, 2) / n
            model.eval()
            out_eval[name] = _time(forward, 2) / n
        return Costs(out_train, out_eval, data)
    finally:
        torch.set_num_threads(threads)


def run_cost(c: Costs, model: str, epochs: int, n_train: int, n_val: int, teacher: str = "", online: bool = False) -> float:
    """CPU seconds of one run: epochs x (training images x step + val images x forward) + start-up;
    ``online``: the teacher's forward in every step too."""
    per_image = c.data + c.train[model] + (c.eval[teacher] if online and teacher else 0.0)
    return epochs * (n_train * per_image + n_val * (c.eval[model] + c.data / 2)) + c.startup


def store_cost(c: Costs, teacher: str, crops: int, n_train: int) -> float:
    return crops * n_train * (c.data + c.eval[teacher]) + c.startup
