"""The training loop: ``Trainer`` builds a run from its config and ``fit()`` trains, evaluates and checkpoints it.

Design points (see docs/engine.md):
- the teacher is a ``TeacherSource`` chosen once, by the factory the trainer is given
  (``wsld.run.build_trainer`` passes ``wsld.teachers.select.open_teacher_source``); the loop never
  asks which kind it is;
- sampling is deterministic per sample (``data.sampling``), so a run killed at any step and resumed
  from its last checkpoint finishes with the same weights as an uninterrupted run;
- only rank 0 writes files; every file is written atomically.
"""

from __future__ import annotations

import json
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader

from wsld.checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from wsld.config import Config, load_config, to_dict, to_yaml
from wsld.data import DataInfo
from wsld.data.build import build_datasets
from wsld.data.batch import Batch, collate_batch
from wsld.data.gpu_decode import GpuDecoder, collate_encoded, encoded_view, resolve_decode
from wsld.data.identity import data_identity
from wsld.data.prefetch import prefetch
from wsld.data.sampling import ResumableSampler
from wsld.engine.evaluate import evaluate
from wsld.engine.guards import TrainingDiverged, check_teacher_strength, weights_finite
from wsld.engine.health import StepHealth, Verdict
from wsld.engine.hooks import SLOW_STEP_ENV, maybe_kill9, simulated_crash, stop_after_steps
from wsld.engine.loaders import make_loader
from wsld.engine.optim import build_optimizer, effective_lr, lr_factor
from wsld.engine.resume import (
    NOT_COMPARED_ON_RESUME, check_data, check_run_files, epochs_refusal, read_run_record, set_aside_summary, write_run_record,
)  # fmt: skip
from wsld.engine.rundir import MetricsLog, RunDirClaim, config_diff, write_probe
from wsld.engine.stats import EpochStats
from wsld.engine.step import APPLIED, BatchNormalizer, StepContext, stand_in_inputs, train_step, update_ema
from wsld.engine.stopping import StopRequest, TrainingStopped, signal_name
from wsld.errors import CheckpointError, UserError
from wsld.files import atomic_write_text
from wsld.losses.registry import build_loss
from wsld.model_input import check_takes_images
from wsld.models import build_model, check_model_name, load_weights
from wsld.runtime import Runtime, amp_dtype_for, barrier, broadcast_object, compile_module, seed_everything, set_cpu_threads, use_channels_last
from wsld.teachers.base import TeacherSource
from wsld.teachers.live import set_teacher_bn_mode

# builds the run's teacher source once the data is known: (data info, log) -> source or None
TeacherFactory = Callable[[DataInfo, Callable[[str], None]], Optional[TeacherSource]]


class Trainer:
    """Builds everything from a Config, then ``fit()`` trains and evaluates the student."""

    def __init__(self, cfg: Config, run_dir: Path | str, rt: Runtime, *, resume: bool = False, role: str = "student",
                 teacher_factory: Optional[TeacherFactory] = None, allow_data_change: bool = False):  # fmt: skip
        # validated and resolved whoever built it (a programmatic config may hold older spellings, e.g. an
        # unfilled distill.params section), so config.yaml and a resume's comparison see one form
        self.cfg, self.rt, self.role = load_config(None, base=to_dict(cfg)), rt, role
        self.run_dir = Path(os.path.abspath(run_dir))  # summary.json and every message name it absolutely
        self.resume, self.teacher_factory, self.allow_data_change = resume, teacher_factory, allow_data_change

    # -- helpers
    def say(self, msg: str) -> None:
        if self.rt.is_main:
            print(f"[wsld] {msg}", file=sys.stderr, flush=True)

    def _loader(self, dataset, sampler, batch_size: int, drop_last: bool, collate_fn: Optional[Callable] = None) -> DataLoader:
        return make_loader(
            dataset, sampler, batch_size, workers=self.cfg.data.workers, device=self.rt.device, drop_last=drop_last,
            seed=self.cfg.train.seed, collate_fn=collate_fn,
        )  # fmt: skip

    def check_batch(self) -> None:
        """Before any collective call or file: the global batch splits evenly among the processes."""
        cfg, rt = self.cfg, self.rt
        if cfg.data.batch_size % rt.world_size:
            raise UserError(
                f"config key 'data.batch_size': global batch {cfg.data.batch_size} is not divisible by the "
                f"{rt.world_size} processes (give a multiple of {rt.world_size})"
            )

    def setup(self) -> None:
        cfg, rt = self.cfg, self.rt
        self.check_batch()
        # cheap checks first: a typo must not cost a teacher training or a data scan
        check_model_name(cfg.model.student, "model.student")
        if cfg.distill.loss != "ce" and not cfg.distill.soft_labels:
            check_model_name(cfg.model.teacher, "model.teacher")
        self.amp_dtype = amp_dtype_for(cfg.train.amp, rt.device)
        if cfg.model.sync_bn and rt.distributed and rt.device.type != "cuda":
            raise UserError("config key 'model.sync_bn': SyncBatchNorm needs CUDA devices; set model.sync_bn=false on CPU")
        set_cpu_threads(cfg, rt)
        seed_everything(cfg.train.seed, cfg.train.deterministic, rt.device)
        self.train_ds, self.val_ds, self.info = build_datasets(cfg.data, seed=cfg.train.seed)
        info: DataInfo = self.info  # its identity (one stat pass, rank 0) is checked against the run's record before any teacher work
        info.identity = broadcast_object(rt, data_identity(self.train_ds, self.val_ds) if rt.is_main else None)
        info.allow_data_change = self.allow_data_change
        if self.resume and (self.run_dir / "last.pt").is_file():
            check_data(read_run_record(self.run_dir), info, self.run_dir, self.say)
        self.per_rank_batch = cfg.data.batch_size // rt.world_size
        if len(self.train_ds) < cfg.data.batch_size:
            raise UserError(
                f"config key 'data.batch_size': {cfg.data.batch_size} is larger than the training split ({len(self.train_ds)} images): give a smaller one (configs/own_photos_small.yaml is the recipe for a few hundred photos)"
            )
        # models
        self.loss = build_loss(cfg.distill)
        self.teacher: Optional[TeacherSource] = None
        if self.loss.needs_teacher:
            if self.teacher_factory is None:
                raise RuntimeError("a distillation loss needs a teacher: build the trainer with wsld.run.build_trainer")
            self.teacher = self.teacher_factory(info, self.say)
        torch.manual_seed(cfg.train.seed)  # student init independent of what ran before
        self.student = build_model(cfg.model.student, info.num_classes, in_channels=info.in_channels, weights=cfg.model.student_weights,
                                   replace_head_if_needed=cfg.model.replace_head, role="student", log=self.say, key=f"model.{self.role}")
        check_takes_images(self.student, cfg.model.student, info.in_channels, info.image_size, info.num_classes)
        dev = rt.device
        self.channels_last = use_channels_last(cfg.model.channels_last, dev)
        mf = torch.channels_last if self.channels_last else torch.contiguous_format
        self.student.to(dev, memory_format=mf)
        if cfg.model.sync_bn and rt.distributed:
            self.student = nn.SyncBatchNorm.convert_sync_batchnorm(self.student)
        self.scaler = torch.amp.GradScaler("cuda") if self.amp_dtype == torch.float16 else None  # fp16 is CUDA-only
        self.base_lr = effective_lr(cfg)
        self.optimizer = build_optimizer(self.student, cfg, self.base_lr)
        for g in self.optimizer.param_groups:
            g["initial_lr"] = self.base_lr
        self.ema = None
        if cfg.train.ema_decay > 0:
            from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

            self.ema = AveragedModel(self.student, multi_avg_fn=get_ema_multi_avg_fn(cfg.train.ema_decay), use_buffers=True)
        self.model = self.student
        if rt.distributed:
            self.model = nn.parallel.DistributedDataParallel(
                self.student, device_ids=[dev.index] if dev.type == "cuda" else None
            )
        run_student = compile_module(self.model) if cfg.model.compile else self.model
        self.ctx = StepContext(
            student=run_student, teacher=self.teacher, loss_fn=self.loss, optimizer=self.optimizer, scaler=self.scaler,
            amp_dtype=self.amp_dtype, grad_clip=cfg.train.grad_clip, params_module=self.student,
        )  # fmt: skip
        # data.decode: uint8 images normalised on the device, or JPEG bytes decoded there (gpu_decode)
        self.decode = resolve_decode(cfg.data.decode, dev, self.train_ds)
        self.normalize: BatchNormalizer | GpuDecoder = BatchNormalizer(info.mean, info.std, dev, self.channels_last)
        val_collate: Optional[Callable] = None
        if self.decode == "gpu":
            self.train_ds, self.val_ds = encoded_view(self.train_ds), encoded_view(self.val_ds)
            self.normalize = GpuDecoder(info.mean, info.std, info.image_size, dev, self.channels_last, on_corrupt=cfg.data.on_corrupt)
            val_collate = collate_encoded
        # data
        self.train_sampler = ResumableSampler(
            len(self.train_ds), batch_size=self.per_rank_batch, seed=cfg.train.seed, shuffle=True,
            rank=rt.rank, world_size=rt.world_size, pad=True, with_seeds=True,
        )  # fmt: skip
        self.steps_per_epoch = self.train_sampler.batches_per_epoch(drop_last=True)
        val_bs = (cfg.data.val_batch_size or cfg.data.batch_size) // rt.world_size or 1
        val_sampler = ResumableSampler(
            len(self.val_ds), batch_size=val_bs, shuffle=False, rank=rt.rank, world_size=rt.world_size, pad=False, with_seeds=False
        )
        self.val_loader = self._loader(self.val_ds, val_sampler, val_bs, drop_last=False, collate_fn=val_collate)
        train_collate: Callable[[list], Batch] = collate_batch
        if self.teacher is not None:  # e.g. stored soft labels replay their crops and attach their records
            self.train_ds, self.train_sampler, train_collate = self.teacher.prepare_train_data(self.train_ds, self.train_sampler)
        if self.decode == "gpu":  # takes (image, label) and (image, label, record) items alike
            train_collate = collate_encoded
        self.train_loader = self._loader(self.train_ds, self.train_sampler, self.per_rank_batch, drop_last=True, collate_fn=train_collate)

    def _state(self, epoch: int, step_in_epoch: int, global_step: int, stats: Optional["EpochStats"] = None) -> dict[str, Any]:
        # per-rank parts (RNG states, running sums), gathered to rank 0, which writes the file
        mine = (rng_state(), stats.state() if stats is not None else None)
        per_rank = [mine]
        if self.rt.distributed:
            per_rank = [None] * self.rt.world_size
            dist.all_gather_object(per_rank, mine)
        rngs = [r for r, _ in per_rank]
        return {
            "format": "wsld-checkpoint-1",
            "student": {k: v.detach().cpu() for k, v in self.student.state_dict().items()},
            "student_arch": self.cfg.model.student,
            "num_classes": self.info.num_classes,
            "classes": list(self.info.classes),
            "data_identity": self.info.identity,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.sched.state_dict() if self.sched is not None else None,
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "ema": {k: v.detach().cpu() for k, v in self.ema.module.state_dict().items()} if self.ema is not None else None,
            "ema_n_averaged": int(self.ema.n_averaged.item()) if self.ema is not None else 0,
            "epoch": epoch,
            "step_in_epoch": step_in_epoch,
            "global_step": global_step,
            "epoch_stats": [st for _, st in per_rank] if stats is not None else None,
            "best_top1": self.best_top1,
            "best_epoch": self.best_epoch,
            "teacher_eval": self.teacher_eval,
            "skipped_steps": self.skipped_steps,
            "corrupt_count": self.corrupt_count,
            "metrics_lines": self.metrics.lines,
            "world_size": self.rt.world_size,
            "rng": rngs,
            "config": to_dict(self.cfg),
        }

    def _save(self, names: tuple[str, ...], epoch: int, step_in_epoch: int, global_step: int, stats: Optional["EpochStats"] = None) -> None:
        """Write the same state under each name, in order (collective: every rank calls it)."""
        self._check_finite_weights(epoch, step_in_epoch, global_step)
        state = self._state(epoch, step_in_epoch, global_step, stats)
        if self.rt.is_main:
            for name in names:
                save_checkpoint(state, self.run_dir / name)

    def _restore(self) -> tuple[int, int, int, int, Optional[dict]]:
        path = self.run_dir / "last.pt"
        ck = load_checkpoint(path)
        # keys added since the run was made: their defaults; older spellings read as config.yaml's are (validate)
        saved_cfg = load_config(None, base=ck.get("config", {}))
        diff = [k for k in config_diff(to_dict(saved_cfg), to_dict(self.cfg)) if k not in NOT_COMPARED_ON_RESUME]
        if diff:
            raise UserError(f"cannot resume {self.run_dir}: its checkpoint was trained with other values of {', '.join(diff)} (start a new run instead)")
        why = epochs_refusal(self.run_dir, saved_cfg, self.cfg, ck["epoch"], ck["step_in_epoch"], ck["global_step"], self.steps_per_epoch)
        if why:
            raise UserError(why)
        self.saved_epochs = saved_cfg.train.epochs
        check_data({"classes": ck.get("classes"), "data": ck.get("data_identity")}, self.info, self.run_dir, self.say)
        load_weights(self.student, ck["student"], str(path), self.cfg.model.student)
        try:
            self.optimizer.load_state_dict(ck["optimizer"])
        except (ValueError, KeyError) as e:
            raise CheckpointError(f"{path}: optimizer state does not fit this run ({e})") from None
        if self.scaler is not None and ck.get("scaler"):
            self.scaler.load_state_dict(ck["scaler"])
        if self.ema is not None and ck.get("ema") is not None:
            self.ema.module.load_state_dict(ck["ema"])
            self.ema.n_averaged.fill_(ck.get("ema_n_averaged", 0))
        self.best_top1, self.best_epoch = ck["best_top1"], ck["best_epoch"]
        self.teacher_eval = ck.get("teacher_eval")
        self.skipped_steps = ck.get("skipped_steps", 0)
        self.corrupt_count = ck.get("corrupt_count", 0)
        rngs = ck.get("rng") or []
        if rngs:
            set_rng_state(rngs[self.rt.rank] if self.rt.rank < len(rngs) else rngs[0])
        if ck.get("world_size", 1) != self.rt.world_size:
            self.say(f"resuming a {ck.get('world_size', 1)}-process run with {self.rt.world_size} processes: same global batches, equal to float rounding only")
        stats = ck.get("epoch_stats")
        if stats and len(stats) != self.rt.world_size:
            stats = None  # other world size: the partial epoch's running sums start over
        return ck["epoch"], ck["step_in_epoch"], ck["global_step"], int(ck.get("metrics_lines") or 0), stats[self.rt.rank] if stats else None

    def _estimated_checkpoint_bytes(self) -> int:
        n = sum(p.numel() * p.element_size() for p in self.student.parameters())
        return int(n * (3 + (1 if self.ema is not None else 0))) + (1 << 20)

    def _evaluate_all(self, progress: bool) -> tuple[dict, Optional[dict]]:
        C = self.info.num_classes
        res = evaluate(self.student, self.val_loader, self.normalize, C, self.rt, self.amp_dtype, progress, "eval")
        ema = None
        if self.ema is not None:
            ema = evaluate(self.ema.module, self.val_loader, self.normalize, C, self.rt, self.amp_dtype, progress, "eval ema")
        return res, ema

    def fit(self) -> dict[str, Any]:
        """Train the run. The run directory is taken first (its lock, then the folder checked under
        it), before any data, teacher or evaluation work; SIGTERM/SIGINT are honoured from then on."""
        self.check_batch()
        with StopRequest() as stop, RunDirClaim(self.run_dir, self.rt, fresh=not self.resume):
            return self._prepare_and_fit(stop)

    def _prepare_and_fit(self, stop: StopRequest) -> dict[str, Any]:
        cfg, rt = self.cfg, self.rt
        self.setup()
        self.sched = None
        self.best_top1, self.best_epoch = -1.0, -1
        self.teacher_eval: Optional[dict] = None
        self.skipped_steps = 0
        self.corrupt_count = 0
        start_epoch, start_step, global_step, metrics_lines = 0, 0, 0, 0
        saved_stats: Optional[dict] = None
        if self.resume and not (self.run_dir / "last.pt").is_file():
            self.say(f"{self.run_dir} holds no checkpoint yet: starting it from the beginning")
            self.resume = False
        if self.resume:
            start_epoch, start_step, global_step, metrics_lines, saved_stats = self._restore()
            check_run_files(self.run_dir, cfg, self.teacher.describe() if self.teacher is not None else {})
        progress = cfg.train.progress and rt.is_main
        fresh_teacher_eval = self.teacher is not None and self.teacher.runs_model and self.teacher_eval is None
        if fresh_teacher_eval:
            self.teacher_eval = evaluate(self.teacher.model, self.val_loader, self.normalize, self.info.num_classes, rt, self.amp_dtype, progress, "teacher eval")
            set_teacher_bn_mode(self.teacher.model, cfg.model.teacher_bn_mode)
            self.say(f"teacher top-1 {self.teacher_eval['top1']:.2f}  top-5 {self.teacher_eval['top5']:.2f}")
        self._check_teacher_strength()
        return self._fit(stop, start_epoch, start_step, global_step, metrics_lines, saved_stats, fresh_teacher_eval)

    def _fit(self, stop: StopRequest, start_epoch: int, start_step: int, global_step: int, metrics_lines: int,
             saved_stats: Optional[dict], fresh_teacher_eval: bool) -> dict[str, Any]:  # fmt: skip
        cfg, rt = self.cfg, self.rt
        if rt.is_main:
            write_probe(self.run_dir, self._estimated_checkpoint_bytes())
            atomic_write_text(self.run_dir / "config.yaml", to_yaml(cfg))
            if self.role == "student":  # where it started and what its files held (wsld.engine.resume)
                # a fresh run starts a fresh record (an earlier start in this folder may have left one)
                write_run_record(self.run_dir, cfg, self.teacher.describe() if self.teacher is not None else {}, self.info.identity,
                                 replace=not self.resume)  # fmt: skip
            if self.resume:
                set_aside_summary(self.run_dir, self.saved_epochs, cfg.train.epochs, self.say)
        barrier(rt)
        # a fresh run empties metrics.jsonl and TensorBoard; a resumed one drops what came after its checkpoint
        self.metrics = MetricsLog(self.run_dir, rt.is_main, purge_step=global_step + 1 if self.resume else 0, keep_lines=metrics_lines)
        self.say(
            f"{self.role}: {cfg.model.student} on {cfg.data.dataset} ({len(self.train_ds)} train / {len(self.val_ds)} val, "
            f"{self.info.num_classes} classes), loss={cfg.distill.loss}, device={rt.device}, world={rt.world_size}, "
            f"amp={self.amp_dtype}, channels_last={self.channels_last}"
            + (f", teacher: {self.teacher.name}" if self.teacher is not None else "")
        )
        self.say(
            f"batch {self.per_rank_batch} per device x {rt.world_size} = {cfg.data.batch_size} global; "
            f"lr {self.base_lr:g} (train.lr {cfg.train.lr:g} for a global batch of train.base_batch_size "
            f"{cfg.train.base_batch_size}, scaled linearly), {self.steps_per_epoch} steps per epoch"
        )
        if not self.resume:
            self.metrics.write({
                "kind": "start", "role": self.role, "loss": cfg.distill.loss, "student": cfg.model.student,
                "teacher": None, "teacher_weights": None, "teacher_bn_mode": None,
                **(self.teacher.describe() if self.teacher is not None else {}),
                "world_size": rt.world_size, "lr": self.base_lr, "steps_per_epoch": self.steps_per_epoch,
                "amp": str(self.amp_dtype), "channels_last": self.channels_last, "decode": self.decode, "global_step": 0,
            })  # fmt: skip
        else:
            self.say(f"resuming {self.run_dir} at epoch {start_epoch + 1}, step {start_step} (global step {global_step})")
            self.metrics.write({"kind": "resume", "epoch": start_epoch + 1, "step": start_step, "global_step": global_step, "world_size": rt.world_size})
        if fresh_teacher_eval:
            self.metrics.write({"kind": "teacher_eval", "global_step": global_step, **self.teacher_eval}, step=0)

        warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step\\(\\)` before")
        # the schedule is a pure function of the global step: restoring the step restores the lr
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: lr_factor(cfg, s / self.steps_per_epoch))
        self.sched.last_epoch = global_step - 1
        self.sched.step()  # lr for global_step
        self.student.train()
        signum = stop.requested(rt.distributed, rt.device)
        if signum:  # asked during data loading, the teacher phase or an evaluation: stop before the first step
            self._save(("last.pt",), start_epoch, start_step, global_step)
            self._stopped(signum, start_epoch, start_step, global_step)
        return self._epochs(stop, start_epoch, start_step, global_step, saved_stats)

    def _epochs(self, stop: StopRequest, start_epoch: int, start_step: int, global_step: int, saved_stats: Optional[dict]) -> dict[str, Any]:
        from tqdm import tqdm

        cfg, rt = self.cfg, self.rt
        progress = cfg.train.progress and rt.is_main
        stop_after = stop_after_steps(self.role)
        slow_step_s = float(os.environ.get(SLOW_STEP_ENV) or 0)
        C = self.info.num_classes
        last_eval: Optional[dict] = None
        last_ema_eval: Optional[dict] = None
        steps_here = 0
        for epoch in range(start_epoch, cfg.train.epochs):
            first = start_step if epoch == start_epoch else 0
            self.train_sampler.set_epoch(epoch, first)
            stats = EpochStats(C, rt.device)
            health = StepHealth(cfg.train.log_every, rt.distributed, rt.device)
            if epoch == start_epoch and saved_stats is not None:
                stats.load(saved_stats)
            bar = tqdm(total=self.steps_per_epoch, initial=first, desc=f"{self.role} epoch {epoch + 1}/{cfg.train.epochs}",
                       disable=not progress, mininterval=1.0, leave=False, dynamic_ncols=True)  # fmt: skip
            t_wait = time.perf_counter()
            step = first
            for batch in prefetch(self.train_loader, self.normalize.prepare, rt.device):  # on the device, one batch ahead
                stats.wait += time.perf_counter() - t_wait
                if batch.corrupt:
                    self._handle_corrupt(batch.corrupt, epoch, step)
                lr_used = self.optimizer.param_groups[0]["lr"]
                if len(batch) or rt.distributed:  # an empty batch (all corrupt) is skipped; under DDP a stand-in is run and discarded
                    self.loss.set_epoch(epoch + step / self.steps_per_epoch)  # for losses that follow training progress (DKD's warm-up)
                    x, y = (batch.images, batch.targets.to(rt.device, non_blocking=True)) if len(batch) else stand_in_inputs(self.info, rt.device, self.channels_last)
                    stats.step_started()  # CUDA: events that time the device's busy share (metrics gpu_busy_frac)
                    res = train_step(self.ctx, x, y, batch, stand_in=not len(batch))
                    if self.ema is not None:
                        update_ema(self.ema, self.student, cfg.train.ema_decay, res)
                    stats.add(res.loss, res.parts, y, res.status == APPLIED)  # (and marks the step's end)
                    health.record(res.status, epoch, step, global_step)
                step += 1
                global_step += 1
                steps_here += 1
                self.sched.step()
                stats.imgs += len(batch) * rt.world_size
                stats.lr = lr_used
                bar.update(1)
                log_due = cfg.train.log_every and global_step % cfg.train.log_every == 0
                save_due = cfg.checkpoint.every_steps and global_step % cfg.checkpoint.every_steps == 0 and step < self.steps_per_epoch
                signum = stop.signum if not rt.distributed else None  # under DDP: agreed at the next read
                if log_due or save_due or signum or health.pending >= health.window:
                    signum = self._read_health(health, stats, stop)
                if log_due and stats.n:
                    rec = self._train_record(stats, epoch, step, global_step)
                    bar.set_postfix(loss=f"{rec['loss']:.3f}", lr=f"{rec['lr']:.3g}")
                if save_due:
                    self._save(("last.pt",), epoch, step, global_step, stats)
                if stop_after and steps_here >= stop_after:
                    simulated_crash(rt, global_step, self.say)
                if slow_step_s:
                    time.sleep(slow_step_s)
                maybe_kill9(rt, steps_here)
                if signum:
                    self._save(("last.pt",), epoch, step, global_step, stats)
                    self._stopped(signum, epoch, step, global_step)
                t_wait = time.perf_counter()
            epoch_signum = self._read_health(health, stats, stop)
            bar.close()
            if stats.n:
                self._train_record(stats, epoch, step, global_step)
            class_w = stats.class_weights(rt)
            if class_w is not None:
                self.metrics.write({"kind": "class_weights", "epoch": epoch + 1, "global_step": global_step, "mean_weight": class_w})
            is_last = epoch + 1 == cfg.train.epochs
            names: tuple[str, ...] = ("last.pt",)
            if cfg.checkpoint.keep_every_epochs and (epoch + 1) % cfg.checkpoint.keep_every_epochs == 0:
                names = (f"epoch_{epoch + 1}.pt", *names)  # kept: never overwritten by a later epoch
            if (epoch + 1) % cfg.train.eval_every == 0 or is_last:
                last_eval, last_ema_eval = self._evaluate_all(progress)
                rec = {"kind": "eval", "epoch": epoch + 1, "global_step": global_step, **last_eval}
                if last_ema_eval is not None:
                    rec.update({"ema_top1": last_ema_eval["top1"], "ema_top5": last_ema_eval["top5"]})
                self.metrics.write(rec, step=global_step)
                if last_eval["top1"] > self.best_top1:
                    self.best_top1, self.best_epoch = last_eval["top1"], epoch + 1
                    # best.pt before last.pt: a crash in between redoes this epoch and rewrites both
                    names = (*names[:-1], "best.pt", "last.pt")
                self.say(
                    f"{self.role} epoch {epoch + 1}/{cfg.train.epochs}: top-1 {last_eval['top1']:.2f} top-5 {last_eval['top5']:.2f}"
                    + (f" (EMA {last_ema_eval['top1']:.2f})" if last_ema_eval else "")
                    + f"  best {self.best_top1:.2f} @ epoch {self.best_epoch}"
                )
            self._save(names, epoch + 1, 0, global_step)
            signum = epoch_signum if rt.distributed else stop.signum
            if signum and not is_last:
                self._stopped(signum, epoch + 1, 0, global_step)
        if last_eval is None:  # resumed after the final epoch had finished
            last_eval, last_ema_eval = self._evaluate_all(progress)
        summary = {
            "role": self.role,
            "loss": cfg.distill.loss,
            "student": cfg.model.student,
            "teacher": cfg.model.teacher if self.teacher is not None and self.teacher.runs_model else None,
            "teacher_bn_mode": cfg.model.teacher_bn_mode if self.teacher is not None and self.teacher.runs_model else None,
            "soft_labels": cfg.distill.soft_labels,
            "epochs": cfg.train.epochs,
            "last_top1": last_eval["top1"],
            "last_top5": last_eval["top5"],
            "last_per_class_top1": last_eval["per_class_top1"],
            "last_checkpoint": "last.pt",
            "best_top1": self.best_top1,
            "best_epoch": self.best_epoch,
            "best_checkpoint": "best.pt",
            "ema_last_top1": last_ema_eval["top1"] if last_ema_eval else None,
            "ema_last_top5": last_ema_eval["top5"] if last_ema_eval else None,
            "teacher_top1": self.teacher_eval["top1"] if self.teacher_eval else None,
            "teacher_top5": self.teacher_eval["top5"] if self.teacher_eval else None,
            "teacher_per_class_top1": self.teacher_eval["per_class_top1"] if self.teacher_eval else None,
            "skipped_steps": self.skipped_steps,
            "corrupt_images": self.corrupt_count,
            "decode": self.decode,
            "decode_counts": self.normalize.stats.as_dict() if isinstance(self.normalize, GpuDecoder) else None,
            "global_step": global_step,
            "world_size": rt.world_size,
            "run_dir": str(self.run_dir),
        }
        self.metrics.write({"kind": "summary", **summary})
        self.metrics.close()
        if rt.is_main:
            atomic_write_text(self.run_dir / "summary.json", json.dumps(summary, indent=2))
        barrier(rt)
        return summary

    def _stopped(self, signum: int, epoch: int, step: int, global_step: int) -> None:
        """After the checkpoint of a SIGTERM/SIGINT stop: one line naming it and how to continue."""
        barrier(self.rt)
        where = f"epoch {epoch + 1}, step {step}" if step else f"the end of epoch {epoch}" if epoch else "the start of epoch 1"
        self.metrics.write({"kind": "stopped", "signal": signal_name(signum), "epoch": epoch + 1, "step": step, "global_step": global_step})
        self.metrics.close()
        how = (f"continue with: wsld train --resume {self.run_dir}" if self.role == "student"
               else "run the same wsld train command again to continue the teacher's training")  # fmt: skip
        raise TrainingStopped(f"stopped by {signal_name(signum)} at {where} (global step {global_step}): checkpoint {self.run_dir / 'last.pt'} written; {how}", signum)

    def _check_teacher_strength(self) -> None:
        if self.teacher_eval:
            check_teacher_strength(self.teacher_eval["top1"], self.info.num_classes, self.cfg.distill.allow_weak_teacher, self.say)

    def _check_finite_weights(self, epoch: int, step: int, global_step: int) -> None:
        """Never write non-finite weights under last.pt/best.pt (an inf rate or a blown-up update
        can make them so without a non-finite loss)."""
        if weights_finite(self.student, self.ema.module if self.ema is not None else None):
            return
        last = self.run_dir / "last.pt"
        good = f"last finite checkpoint: {last}" if last.is_file() else "no checkpoint was written yet"
        self.metrics.write({"kind": "diverged", "epoch": epoch + 1, "step": step, "global_step": global_step, "weights": "not finite"})
        self.metrics.close()
        raise TrainingDiverged(f"the student's weights are not finite after global step {global_step}; not checkpointed ({good}); lower train.lr or set train.grad_clip")

    def _read_health(self, health: StepHealth, stats: EpochStats, stop: StopRequest) -> Optional[int]:
        """The verdicts since the last read (one host read; DDP: one small all-reduce, with the stop signal): train.nan_policy."""
        verdicts, signum = health.read(stop.signum)
        stats.drop(len(verdicts))
        if self.ema is not None:
            self.ema.n_averaged -= len(verdicts)  # update_ema counted them
        for v in verdicts:
            if v.why != "empty":
                self._non_finite(v)
        return signum

    def _train_record(self, stats: "EpochStats", epoch: int, step: int, global_step: int) -> dict:
        dt = max(1e-9, time.perf_counter() - stats.t0)
        rec = {
            "kind": "train", "epoch": epoch + 1, "step": step, "global_step": global_step, **stats.means(self.rt),
            "lr": stats.lr, "img_per_s": stats.imgs / dt, "data_wait_frac": min(1.0, stats.wait / dt), **stats.device_fields(),
        }  # fmt: skip
        self.metrics.write(rec, step=global_step)
        stats.reset_window()
        return rec

    def _handle_corrupt(self, bad: list, epoch: int, step: int) -> None:
        self.corrupt_count += len(bad)
        for b in bad:
            msg = f"corrupt image skipped: {getattr(b, 'path', b)} ({getattr(b, 'error', '')})"
            print(f"[wsld] {msg}", file=sys.stderr, flush=True)
            self.metrics.write({"kind": "corrupt", "epoch": epoch + 1, "step": step, "path": str(getattr(b, "path", b)), "error": str(getattr(b, "error", ""))})

    def _non_finite(self, v: Verdict) -> None:
        """A step whose loss (or gradients) was not finite was not applied: count it (nan_policy=skip)
        or stop (found when the window was read: the steps since went on, but nothing was saved)."""
        where = f"epoch {v.epoch + 1}, step {v.step + 1} (global step {v.global_step + 1})"
        what = "loss is not finite" if v.why == "loss" else "gradients are not finite"
        if self.cfg.train.nan_policy == "skip":
            self.skipped_steps += 1
            self.say(f"non-finite {'loss' if v.why == 'loss' else 'gradients'} at {where}: step skipped ({self.skipped_steps} so far)")
            self.metrics.write({"kind": "skipped_step", "epoch": v.epoch + 1, "step": v.step + 1, "global_step": v.global_step + 1, "why": v.why})
            return
        last = self.run_dir / "last.pt"
        good = f"last good checkpoint: {last}" if last.is_file() else "no checkpoint was written yet"  # only finite weights are ever written
        self.metrics.write({"kind": "diverged", "epoch": v.epoch + 1, "step": v.step + 1, "global_step": v.global_step + 1, "why": v.why})
        self.metrics.close()
        raise TrainingDiverged(f"{what} at {where}; stopped ({good}; set train.nan_policy=skip to skip such steps)")
