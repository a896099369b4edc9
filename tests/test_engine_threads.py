"""train.threads: auto shares the cores among a node's processes; explicit values and OMP_NUM_THREADS win."""

import torch

from wsld.config import load_config
from wsld.runtime import Runtime, cpu_threads


def test_auto_threads_share_the_cores_among_the_processes(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(8)), raising=False)
    rt = Runtime(torch.device("cpu"))
    assert cpu_threads(load_config(None, ["data.workers=2"]), rt) == 8
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert cpu_threads(load_config(None, ["data.workers=1"]), Runtime(torch.device("cpu"), 0, 2)) == 4
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "16")
    assert cpu_threads(load_config(None), Runtime(torch.device("cpu"), 0, 16)) == 1
    assert cpu_threads(load_config(None, ["train.threads=5"]), rt) == 5


def test_omp_num_threads_or_cuda_keep_torch_default(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert cpu_threads(load_config(None), Runtime(torch.device("cpu"))) is None
    monkeypatch.delenv("OMP_NUM_THREADS")
    assert cpu_threads(load_config(None), Runtime(torch.device("cuda", 0))) is None
