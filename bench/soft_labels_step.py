#!/usr/bin/env python
"""Step time with stored soft labels vs online distillation (the engine's own ``train_step``).

In one process, on one batch of random images, median over ``--iters`` timed steps after warm-up:

- ``online``: the WSLD step as ``wsld train`` runs it: teacher forward (no grad) + student step;
- ``cached``: the WSLD step with ``distill.soft_labels``: no teacher; the teacher's logits are
  rebuilt from the batch's stored top-k records (``logits_from_records``, what
  ``StoredTeacher.logits`` runs), which arrive as the tensors ``collate_replay`` makes (pinned
  when on CUDA);
- ``student CE``: the student step alone (the floor for any distillation step);
- ``records -> tensors``: the loader-side cost of turning a batch of stored records into those
  tensors (done in DataLoader workers during training, so overlapped with the step).

On CUDA the steps use bf16 autocast and channels_last, as the engine does by default there.
Prints a table (ratios first) and appends the results to bench/results/soft_labels_step.json.
Example: ``.venv/bin/python bench/soft_labels_step.py --teacher resnet34 --student resnet18 --batch-size 256``
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "src"))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from wsld.engine.step import StepContext, train_step  # noqa: E402
from wsld.runtime import amp_dtype_for  # noqa: E402
from wsld.teachers.live import set_teacher_bn_mode  # noqa: E402
from wsld.losses.registry import DistillLoss  # noqa: E402
from wsld.models import build_model  # noqa: E402
from wsld.data.batch import Batch  # noqa: E402
from wsld.soft_labels.store import logits_from_records, records_from_logits, records_to_tensors  # noqa: E402


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def time_it(fn, iters: int, warmup: int, dev: torch.device) -> list[float]:
    for _ in range(warmup):
        fn()
    _sync(dev)
    out = []
    for _ in range(iters):
        t = time.perf_counter()
        fn()
        _sync(dev)
        out.append(time.perf_counter() - t)
    return out


class RecordsTeacher:
    """The logits half of ``wsld.teachers.stored.StoredTeacher``, for the batch made here (no store on disk)."""

    def __init__(self, num_classes: int):
        self.num_classes = num_classes

    def logits(self, images: torch.Tensor, batch: Batch) -> torch.Tensor:
        return logits_from_records(batch.teacher_records, batch.targets, self.num_classes, images.device)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    ap.add_argument("--teacher", default="resnet34")
    ap.add_argument("--student", default="resnet18")
    ap.add_argument("--classes", type=int, default=1000)
    ap.add_argument("--image-size", type=int, default=None, help="default: 224 on CUDA, 112 on CPU")
    ap.add_argument("--batch-size", type=int, default=None, help="default: 256 on CUDA, 16 on CPU")
    ap.add_argument("--topk", type=int, default=10, help="stored classes per crop (default 10)")
    ap.add_argument("--precision", choices=["float16", "float32"], default="float16")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--amp", choices=["auto", "off", "bf16"], default="auto", help="as train.amp (auto: bf16 on CUDA)")
    ap.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "soft_labels_step.json"),
                    help="JSON file the results are appended to (default: %(default)s)")
    args = ap.parse_args(argv)

    dev = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cuda = dev.type == "cuda"
    size = args.image_size or (224 if cuda else 112)
    bs = args.batch_size or (256 if cuda else 16)
    amp = amp_dtype_for(args.amp, dev)
    mf = torch.channels_last if cuda else torch.contiguous_format
    torch.manual_seed(0)
    if cuda:
        torch.backends.cudnn.benchmark = True
    teacher = build_model(args.teacher, args.classes, role="teacher").to(dev, memory_format=mf)
    set_teacher_bn_mode(teacher, "eval")
    student = build_model(args.student, args.classes, role="student").to(dev, memory_format=mf).train()
    x = torch.randn(bs, 3, size, size, device=dev).contiguous(memory_format=mf)
    y = torch.randint(0, args.classes, (bs,), device=dev)
    loss = DistillLoss("wsld", T=2.0, alpha=2.5)
    opt = torch.optim.SGD(student.parameters(), lr=1e-4, momentum=0.9, nesterov=True)

    # the batch's records, as a store would hold them (the teacher's real outputs on this batch)
    with torch.no_grad(), torch.autocast(dev.type, dtype=amp, enabled=amp is not None):
        z = teacher(x).float()
    k = min(args.topk, args.classes)
    recs = records_from_logits(z, y, k, args.precision)
    raw = [recs[i : i + 1].tobytes() for i in range(bs)]  # one LMDB value each, as workers read them

    def to_tensors():
        return records_to_tensors(np.concatenate([np.frombuffer(r, dtype=recs.dtype) for r in raw]))

    extra, y_cpu = to_tensors(), y.cpu()
    if cuda:
        extra, y_cpu = {kk: v.pin_memory() for kk, v in extra.items()}, y_cpu.pin_memory()
    batch = Batch(None, y_cpu, [], teacher_records=extra)

    online = StepContext(student=student, teacher=teacher, loss_fn=loss, optimizer=opt, amp_dtype=amp)
    cached = StepContext(student=student, teacher=RecordsTeacher(args.classes), loss_fn=loss, optimizer=opt, amp_dtype=amp)
    ce_only = StepContext(student=student, teacher=None, loss_fn=DistillLoss("ce"), optimizer=opt, amp_dtype=amp)

    times = {}
    # interleave the measured variants in rounds so slow drifts of a shared machine hit all alike
    rounds = 4
    per = max(1, args.iters // rounds)
    for name in ("online", "cached", "student CE"):
        times[name] = []
    for r in range(rounds):
        times["online"] += time_it(lambda: train_step(online, x, y), per, args.warmup if r == 0 else 1, dev)
        times["cached"] += time_it(lambda: train_step(cached, x, y, batch), per, args.warmup if r == 0 else 1, dev)
        times["student CE"] += time_it(lambda: train_step(ce_only, x, y), per, args.warmup if r == 0 else 1, dev)
    times["records -> tensors"] = time_it(to_tensors, max(5, args.iters), 2, torch.device("cpu"))

    med = {kk: statistics.median(v) for kk, v in times.items()}
    rows = [
        ("cached / online", med["cached"] / med["online"]),
        ("online / student CE (distillation overhead)", med["online"] / med["student CE"]),
        ("cached / student CE", med["cached"] / med["student CE"]),
    ]
    dev_name = torch.cuda.get_device_name(dev) if cuda else f"{platform.machine()} CPU, {torch.get_num_threads()} threads"
    print(f"{args.teacher} -> {args.student}, {args.classes} classes, batch {bs} at {size}px, top-{k} {args.precision}, "
          f"amp={amp}, channels_last={cuda}, {dev_name}, torch {torch.__version__}")  # fmt: skip
    print(f"{'ratio':<46}{'median':>10}")
    for name, v in rows:
        print(f"{name:<46}{v:>10.3f}")
    print(f"\n{'step':<24}{'median ms':>12}{'min ms':>10}{'max ms':>10}{'img/s':>10}")
    for name, v in times.items():
        ips = bs / med[name] if name != "records -> tensors" else float("nan")
        print(f"{name:<24}{med[name] * 1e3:>12.2f}{min(v) * 1e3:>10.2f}{max(v) * 1e3:>10.2f}{ips:>10.0f}")

    result = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S"), "command": " ".join([Path(sys.argv[0]).name, *(argv or sys.argv[1:])]),
        "device": dev_name, "torch": torch.__version__, "teacher": args.teacher, "student": args.student,
        "classes": args.classes, "batch_size": bs, "image_size": size, "topk": k, "precision": args.precision,
        "amp": str(amp), "iters": len(times["online"]), "median_s": med,
        "min_s": {kk: min(v) for kk, v in times.items()}, "max_s": {kk: max(v) for kk, v in times.items()},
        "ratios": dict(rows), "cpu_count": os.cpu_count(),
    }  # fmt: skip
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    history = json.loads(out.read_text()) if out.exists() else []
    history.append(result)
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(history, indent=1) + "\n")
    os.replace(tmp, out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
