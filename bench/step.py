#!/usr/bin/env python
"""Distillation step cost against its physical limit (the engine's own ``train_step``).

Online distillation must pay for one student training step plus one teacher inference, nothing
more. In one process, on one batch of random images, this times, interleaved round by round
(the order rotates every round, so a shared machine's drifts hit every variant alike):

- (a) the student-only step: ``train_step`` with no teacher and the ``ce`` loss;
- (b) teacher inference alone: the teacher's forward under ``torch.no_grad()`` (same autocast and
  memory format as the step), i.e. what the step spends on the teacher at best;
- (c) the full distillation step as the engine runs it: ``train_step`` with the teacher and the
  ``wsld`` loss, likewise ``kd``, and ``ce`` (the engine runs ``ce`` without a teacher, so it
  equals (a): the ratio between the two is this machine's noise floor);
- (c) ``wsld`` with the per-step finiteness check off: what the check's host sync costs;
- (c) ``wsld`` with stored soft labels (``distill.soft_labels``; ``--soft-labels-topk``): no teacher
  forward, the teacher's logits rebuilt from the batch's stored top-k records;
- (r) with ``--reference-dir PATH`` (a checkout of the reference, bellymonster/Weighted-Soft-Label-
  Distillation): the reference's own step, its ``knowledge_distiller.WSLDistiller`` imported from
  PATH and called as its ``train_with_distillation.py`` loop does (zero_grad, ``d_net(x, y)``,
  mean, ``loss.item()``, zero_grad, backward, SGD step over the student's parameters), teacher and
  student in train mode, always fp32 NCHW and uncompiled as the reference runs. Its models are
  fresh instances of ``--teacher``/``--student`` (torchvision's for the ResNets, random init),
  on the same batch. Nothing of the reference is in this repository; its files need only torch and
  numpy (its ``.cuda()`` calls are sent to the CPU on a CPU run), and its loss fixes 1000 classes.

Reported: the waste ratio (c)/((a)+(b)), target <= 1.05, and the distillation overhead (c)/(a);
with ``--reference-dir``, the reference's waste (r)/((a)+(b)) and (r)/(c) against our wsld step;
each as the ratio of medians and as the median (min-max) of per-round ratios. Timed iterations
follow a warm-up; on CUDA every variant ends with a device synchronisation.

Configurations (``--configs``, comma-separated, each a ``+``-joined set of fp32 | bf16 | cl |
compile): ``fp32`` = float32 NCHW; ``bf16`` = bf16 autocast (``train.amp=bf16``); ``cl`` =
channels_last (``model.channels_last=true``); ``compile`` = ``torch.compile`` on both models
(``model.compile=true``). Default: ``fp32`` on CPU, ``fp32,bf16+cl`` on CUDA (without and with
the engine's CUDA defaults).

Prints a table (ratios first) and appends the results to bench/results/step.json.
Examples:
  python bench/step.py --batch-size 8 --image-size 112 --threads 1   # a small shared CPU: one thread
  python bench/step.py --device cuda --batch-size 256 --configs fp32,bf16+cl,bf16+cl+compile
  python bench/step.py --batch-size 8 --image-size 112 --threads 1 --reference-dir ../Weighted-Soft-Label-Distillation
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib
import math
import statistics
import warnings
import sys
import time
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from bench_common import RESULTS, append_result, command_line, machine, now, setup_device, stats  # noqa: E402
from wsld.config import Config  # noqa: E402
from wsld.engine.optim import build_optimizer  # noqa: E402
from wsld.engine.step import StepContext, train_step  # noqa: E402
from wsld.runtime import autocast, compile_module  # noqa: E402
from wsld.teachers.live import set_teacher_bn_mode  # noqa: E402
from wsld.losses.registry import DistillLoss  # noqa: E402
from wsld.models import build_model  # noqa: E402

# the reference's ImageNet hyper-parameters for wsld; Hinton's usual ones for kd
LOSS_ARGS = {"wsld": {"T": 2.0, "alpha": 2.5}, "kd": {"T": 4.0, "alpha": 0.9}, "ce": {}}
A, B = "(a) student step (ce, no teacher)", "(b) teacher inference (no_grad)"


def step_name(loss: str) -> str:
    return f"(c) {loss} step" + (" (engine: no teacher)" if loss == "ce" else "")


NO_CHECK = "(c) wsld step, finite check off"
CACHED = "(c) wsld step, stored soft labels (no teacher)"
REF = "(r) reference step (its WSLDistiller, fp32)"
REF_FILE = "knowledge_distiller.py"


def load_reference(ref_dir: str):
    """The reference's ``WSLDistiller`` class, imported from its checkout (never part of this repo)."""
    root = Path(ref_dir).expanduser().resolve()
    if not (root / REF_FILE).is_file():
        raise ValueError(f"--reference-dir {ref_dir}: no {REF_FILE} there; give a checkout of bellymonster/Weighted-Soft-Label-Distillation")
    sys.path.insert(0, str(root))  # its modules import each other by top-level name (imagenet_train_cfg, tools)
    try:
        cls = importlib.import_module(REF_FILE.removesuffix(".py")).WSLDistiller
    except Exception as e:  # a missing dependency or another layout: one line, not its traceback
        sys.path.remove(str(root))
        raise ValueError(f"--reference-dir {ref_dir}: importing its {REF_FILE} failed ({type(e).__name__}: {e}); "
                         "it needs its imagenet_train_cfg.py and tools/ beside it, and torch and numpy") from None  # fmt: skip
    return cls, hashlib.sha256((root / REF_FILE).read_bytes()).hexdigest()


@contextlib.contextmanager
def reference_calls(dev: torch.device):
    """What the reference's code needs to run here: its ``.cuda()`` calls (on a 1-element tensor in
    its loss, on parameter-less modules in its constructor) go to ``dev`` on a CPU run; the
    warning of its ``nn.LogSoftmax()`` without ``dim`` is silenced, as its train script does."""
    saved = torch.Tensor.cuda, torch.nn.Module.cuda
    if dev.type != "cuda":
        torch.Tensor.cuda = lambda self, *a, **k: self.to(dev)  # type: ignore[method-assign]
        torch.nn.Module.cuda = lambda self, *a, **k: self.to(dev)  # type: ignore[method-assign]
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Implicit dimension choice")
            yield
    finally:
        torch.Tensor.cuda, torch.nn.Module.cuda = saved  # type: ignore[method-assign]


def parse_config(text: str) -> dict:
    parts = set(text.split("+"))
    unknown = parts - {"fp32", "bf16", "cl", "compile"}
    if unknown or not text:
        raise ValueError(f"--configs entry '{text}' has unknown parts {sorted(unknown)}: use fp32, bf16, cl, compile joined by '+'")
    return {"name": text, "amp": "bf16" in parts, "channels_last": "cl" in parts, "compile": "compile" in parts}


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def measure_config(args, conf: dict, dev: torch.device) -> dict:
    """Build the pair for one configuration, time every variant round by round, return the results."""
    mf = torch.channels_last if conf["channels_last"] else torch.contiguous_format
    amp = torch.bfloat16 if conf["amp"] else None
    torch.manual_seed(0)
    teacher = build_model(args.teacher, args.classes, role="teacher").to(dev, memory_format=mf)
    set_teacher_bn_mode(teacher, args.teacher_bn_mode)
    student = build_model(args.student, args.classes, role="student").to(dev, memory_format=mf).train()
    run_teacher, run_student = teacher, student
    if conf["compile"]:
        run_teacher, run_student = compile_module(teacher), compile_module(student)  # as model.compile=true
    # the engine's optimiser (SGD, Nesterov momentum, weight decay on all parameters); a small lr
    # keeps the random-data run finite, so no step is skipped and every step does its backward
    cfg = Config()
    opt = build_optimizer(student, cfg, lr=args.lr)
    x = torch.randn(args.batch_size, 3, args.image_size, args.image_size, device=dev).contiguous(memory_format=mf)
    y = torch.randint(0, args.classes, (args.batch_size,), device=dev)

    def ctx(loss: str, with_teacher: bool, check: bool = True) -> StepContext:
        return StepContext(
            student=run_student, teacher=run_teacher if with_teacher else None, loss_fn=DistillLoss(loss, **LOSS_ARGS[loss]),
            optimizer=opt, amp_dtype=amp, check_finite=check,
        )  # fmt: skip

    skipped = {"n": 0}
    statuses: list = []  # each checked step's status on the device, read once after the timing

    def stepper(c: StepContext) -> Callable[[], None]:
        def run() -> None:
            statuses.append(train_step(c, x, y).status)

        return run

    def teacher_inference() -> None:
        with torch.no_grad(), autocast(dev, amp):
            run_teacher(x)

    variants: dict[str, Callable[[], None]] = {A: stepper(ctx("ce", False)), B: teacher_inference}
    for loss in args.losses:
        variants[step_name(loss)] = stepper(ctx(loss, loss != "ce"))
    if "wsld" in args.losses and not args.no_check_variant:
        variants[NO_CHECK] = stepper(ctx("wsld", True, check=False))
    if "wsld" in args.losses and args.soft_labels_topk > 0:
        # distill.soft_labels: no teacher forward; its logits rebuilt from this batch's stored top-k
        # records, handed over as the tensors the replay collate makes (docs/soft_labels.md)
        from wsld.data.batch import Batch
        from wsld.soft_labels.store import logits_from_records, records_from_logits, records_to_tensors

        with torch.no_grad(), autocast(dev, amp):
            z = run_teacher(x).float()
        recs, y_cpu = records_to_tensors(records_from_logits(z, y, min(args.soft_labels_topk, args.classes))), y.cpu()
        if dev.type == "cuda":
            recs, y_cpu = {k: v.pin_memory() for k, v in recs.items()}, y_cpu.pin_memory()
        batch = Batch(None, y_cpu, [], teacher_records=recs)

        class RecordsTeacher:  # StoredTeacher's logits, for this in-memory batch (no store on disk)
            def logits(self, images, batch):
                return logits_from_records(batch.teacher_records, batch.targets, args.classes, images.device)

        cached = ctx("wsld", False)
        cached.teacher = RecordsTeacher()

        def cached_step() -> None:
            statuses.append(train_step(cached, x, y, batch).status)

        variants[CACHED] = cached_step

    if args.reference:
        variants[REF] = reference_stepper(args, dev, x, y, skipped)

    names = list(variants)
    t_warm = time.perf_counter()
    for _ in range(args.warmup):
        for n in names:
            variants[n]()
    sync(dev)
    warm_s = time.perf_counter() - t_warm
    skipped["n"] = skipped["reference_nonfinite"] = 0
    statuses.clear()
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(args.iters):
        order = names[r % len(names) :] + names[: r % len(names)]
        for n in order:
            sync(dev)
            t0 = time.perf_counter()
            variants[n]()
            sync(dev)
            times[n].append((time.perf_counter() - t0) * 1e3)

    skipped["n"] = sum(int(st) != 0 for st in statuses if st is not None)

    def ratio(num: str, den: list[str]) -> dict:
        per_round = [times[num][i] / sum(times[d][i] for d in den) for i in range(args.iters)]
        of_medians = statistics.median(times[num]) / sum(statistics.median(times[d]) for d in den)
        of_minimums = min(times[num]) / sum(min(times[d]) for d in den)
        return {"of_medians": of_medians, "of_minimums": of_minimums, "per_round": stats(per_round)}

    ratios: dict[str, dict] = {}
    for loss in args.losses:
        c = step_name(loss)
        if loss != "ce":
            ratios[f"{loss} waste (c)/((a)+(b))"] = ratio(c, [A, B])
            ratios[f"{loss} distillation overhead (c)/(a)"] = ratio(c, [A])
        else:
            ratios["ce step (c)/(a): noise floor, ideally 1"] = ratio(c, [A])
    if NO_CHECK in times:
        ratios["finite check cost: wsld (c) / (c, check off)"] = ratio(step_name("wsld"), [NO_CHECK])
    if CACHED in times:
        ratios["stored soft labels: (c, stored) / (c) wsld"] = ratio(CACHED, [step_name("wsld")])
        ratios["stored soft labels overhead (c, stored)/(a)"] = ratio(CACHED, [A])
    if REF in times:
        ratios["reference waste (r)/((a)+(b))"] = ratio(REF, [A, B])
        if "wsld" in args.losses:
            ratios["reference step / our wsld step (r)/(c)"] = ratio(REF, [step_name("wsld")])
    return {
        "config": conf["name"], "amp": "bf16" if conf["amp"] else "off", "channels_last": conf["channels_last"],
        "compile": conf["compile"], "warmup_s": warm_s, "times_ms": {n: stats(v) for n, v in times.items()},
        "ratios": ratios, "skipped_steps": skipped["n"],
        **({"reference_nonfinite_steps": skipped["reference_nonfinite"]} if REF in times else {}),
    }  # fmt: skip


def reference_stepper(args, dev: torch.device, x: torch.Tensor, y: torch.Tensor, skipped: dict) -> Callable[[], None]:
    """The reference's step on this batch: its distiller wrapping fresh models, its optimiser."""
    distiller_cls = args.reference[0]
    torch.manual_seed(0)  # the same random init as ours, in fresh modules (its teacher trains its BN)
    t_net = build_model(args.teacher, args.classes, role="teacher").to(dev)
    s_net = build_model(args.student, args.classes, role="student").to(dev)
    with reference_calls(dev):
        d_net = distiller_cls(t_net, s_net).to(dev)
    # its recipe's SGD (momentum 0.9, Nesterov, weight decay 1e-4 on all the student's parameters) at
    # this run's --lr: its 0.1 would take random data to non-finite losses
    opt = torch.optim.SGD(list(s_net.parameters()), args.lr, momentum=0.9, weight_decay=1e-4, nesterov=True)
    d_net.train(), s_net.train(), t_net.train()  # as its train_with_distill() sets them
    x = x.float().contiguous()

    def run() -> None:  # its loop's step, call for call (minus the data prefetcher and printing)
        with reference_calls(dev):
            opt.zero_grad()
            outputs, loss = d_net(x, y)
            loss = torch.mean(loss)
            if not math.isfinite(loss.item()):
                skipped["reference_nonfinite"] = skipped.get("reference_nonfinite", 0) + 1
            opt.zero_grad()
            loss.backward()
            opt.step()

    return run


def print_config(res: dict, args) -> None:
    print(f"\n== config {res['config']}: amp={res['amp']}, channels_last={res['channels_last']}, compile={res['compile']}; "
          f"{args.teacher} -> {args.student}, {args.classes} classes, batch {args.batch_size} at {args.image_size} px, "
          f"{args.iters} timed rounds after {args.warmup} warm-up (warm-up took {res['warmup_s']:.1f} s)")  # fmt: skip
    print(f"{'ratio':<48}{'of medians':>11}{'of minima':>10}   {'per round: median (min-max)':<28}{'target':>8}")
    for name, r in res["ratios"].items():
        pr = r["per_round"]
        target = "<= 1.05" if "waste" in name and not name.startswith("reference") else ""
        spread = f"{pr['median']:.3f} ({pr['min']:.3f}-{pr['max']:.3f})"
        print(f"{name:<48}{r['of_medians']:>11.3f}{r['of_minimums']:>10.3f}   {spread:<28}{target:>8}")
    print(f"{'variant':<48}{'median ms':>11}{'min ms':>10}{'max ms':>10}{'img/s':>9}")
    for name, t in res["times_ms"].items():
        print(f"{name:<48}{t['median']:>11.2f}{t['min']:>10.2f}{t['max']:>10.2f}{args.batch_size / t['median'] * 1e3:>9.1f}")
    if res["skipped_steps"]:
        print(f"WARNING: {res['skipped_steps']} timed steps had a non-finite loss and skipped their backward: lower --lr")
    if res.get("reference_nonfinite_steps"):
        print(f"WARNING: {res['reference_nonfinite_steps']} timed reference steps had a non-finite loss: lower --lr")


def main(argv=None) -> int:
    doc = __doc__ or ""
    ap = argparse.ArgumentParser(description=doc.split("\n\n")[0], epilog=doc.split("\n\n", 1)[1],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    ap.add_argument("--teacher", default="resnet34", help="teacher model name (default: %(default)s)")
    ap.add_argument("--student", default="resnet18", help="student model name (default: %(default)s)")
    ap.add_argument("--classes", type=int, default=1000, help="number of classes (default: %(default)s)")
    ap.add_argument("--image-size", type=int, default=224, help="square input size (default: %(default)s)")
    ap.add_argument("--batch-size", type=int, default=None, help="default: 256 on CUDA, 8 on CPU")
    ap.add_argument("--iters", type=int, default=20, help="timed rounds; each times every variant once (default: %(default)s)")
    ap.add_argument("--warmup", type=int, default=3, help="untimed rounds first (default: %(default)s)")
    ap.add_argument("--losses", default="wsld,kd,ce", help="comma-separated losses for (c) (default: %(default)s)")
    ap.add_argument("--configs", default=None, help="comma-separated configurations (see above; default: fp32 on CPU, fp32,bf16+cl on CUDA)")
    ap.add_argument("--no-check-variant", action="store_true", help="skip the 'finite check off' variant")
    ap.add_argument("--soft-labels-topk", type=int, default=10, metavar="K",
                    help="also time wsld with stored top-K soft labels (distill.soft_labels), 0: skip (default: %(default)s)")
    ap.add_argument("--teacher-bn-mode", choices=["eval", "train"], default="eval", help="as model.teacher_bn_mode (default: %(default)s)")
    ap.add_argument("--lr", type=float, default=1e-3, help="SGD learning rate (default: %(default)s; small so random data stays finite)")
    ap.add_argument("--reference-dir", default=None, metavar="PATH",
                    help="also time the reference's own step, importing knowledge_distiller.WSLDistiller from this checkout of "
                         "bellymonster/Weighted-Soft-Label-Distillation (needs --classes 1000, its loss fixes it)")
    ap.add_argument("--cudnn-benchmark", action="store_true", help="set torch.backends.cudnn.benchmark (the engine leaves it off)")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    ap.add_argument("--device", default=None, help="cpu or cuda[:N] (default: cuda if available, else cpu)")
    ap.add_argument("--out", default=str(RESULTS / "step.json"), help="JSON file the results are appended to (default: %(default)s)")
    ap.add_argument("--no-save", action="store_true", help="print only, append nothing")
    args = ap.parse_args(argv)

    dev = setup_device(ap, args.device, args.threads)
    cuda = dev.type == "cuda"
    if args.cudnn_benchmark:
        torch.backends.cudnn.benchmark = True
    args.batch_size = args.batch_size or (256 if cuda else 8)
    args.losses = [s for s in args.losses.split(",") if s]
    for loss in args.losses:
        if loss not in LOSS_ARGS:
            ap.error(f"--losses: unknown loss '{loss}' (choose from {', '.join(LOSS_ARGS)})")
    try:
        confs = [parse_config(c) for c in (args.configs or ("fp32,bf16+cl" if cuda else "fp32")).split(",")]
    except ValueError as e:
        ap.error(str(e))
    if args.iters < 1 or args.warmup < 0:
        ap.error("--iters must be >= 1 and --warmup >= 0")
    args.reference = None
    if args.reference_dir:
        if args.classes != 1000:
            ap.error(f"--reference-dir needs --classes 1000 (the reference's loss one-hot encodes 1000 classes), not {args.classes}")
        try:
            args.reference = load_reference(args.reference_dir)
        except ValueError as e:
            ap.error(str(e))

    info = machine(dev)
    print(f"{info['device']} ({info['host']}), torch {info['torch']}, {info['torch_threads']} threads, "
          f"load average {info['load_average_1min']}, cudnn.benchmark={torch.backends.cudnn.benchmark}")
    results = []
    for conf in confs:
        res = measure_config(args, conf, dev)
        print_config(res, args)
        results.append(res)
        if cuda:
            torch.cuda.empty_cache()
    record = {
        "date": now(), "command": command_line("step.py", argv), "machine": info,
        "load_average_1min_end": machine()["load_average_1min"],
        "teacher": args.teacher, "student": args.student, "classes": args.classes, "batch_size": args.batch_size,
        "image_size": args.image_size, "iters": args.iters, "warmup": args.warmup, "teacher_bn_mode": args.teacher_bn_mode,
        "cudnn_benchmark": bool(torch.backends.cudnn.benchmark), "device_type": dev.type, "results": results,
        **({"reference": {"dir": str(Path(args.reference_dir).resolve()), f"{REF_FILE}_sha256": args.reference[1],
                          "cuda_calls_to_cpu": dev.type != "cuda"}} if args.reference else {}),
    }  # fmt: skip
    if not args.no_save:
        print(f"\nappended to {append_result(args.out, record)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
