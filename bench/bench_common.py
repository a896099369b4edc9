"""Shared helpers of bench/step.py, bench/loss.py and bench/train_throughput.py: machine facts,
timing statistics and the append-only JSON results files."""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Optional

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def load_average() -> Optional[float]:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def machine(device: Any = None) -> dict[str, Any]:
    """What the numbers were measured on (the device line names the GPU when there is one)."""
    import torch

    info: dict[str, Any] = {
        "host": f"{platform.machine()}, {os.cpu_count()} CPU(s): {cpu_name()}",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "load_average_1min": load_average(),
    }
    if device is not None and getattr(device, "type", str(device)) == "cuda":
        info["device"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    else:
        info["device"] = "cpu"
    return info


def stats(values: list[float]) -> dict[str, Any]:
    """Median, min, max and the raw values (for timings: milliseconds)."""
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values), "values": values}


def command_line(script: str, argv: Optional[list[str]]) -> str:
    args = argv if argv is not None else sys.argv[1:]
    return " ".join([f"python bench/{script}", *args])


def append_result(path: str | Path, record: dict[str, Any]) -> Path:
    """Append ``record`` to the JSON list in ``path`` (created if missing), atomically."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    history = json.loads(out.read_text()) if out.exists() else []
    history.append(record)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(history, indent=1) + "\n")
    os.replace(tmp, out)
    return out


def now() -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S")


def setup_device(ap: Any, device: Optional[str], threads: Optional[int]) -> Any:
    """The ``--device``/``--threads`` flags of every bench script: the torch device, checked."""
    import torch

    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dev.type == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda given but CUDA is not available")
    if dev.type == "cuda":
        dev = dev if dev.index is not None else torch.device("cuda", torch.cuda.current_device())
        torch.cuda.set_device(dev)  # torch 2.11 refuses set_device("cuda") without an index
    if threads:
        torch.set_num_threads(threads)
    return dev
