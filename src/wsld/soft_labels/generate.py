"""``wsld soft-labels``: run the teacher on K seeded training crops of every image and write the store, on one or N processes."""

from __future__ import annotations

import json
import os
import struct
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional, TypeVar

import torch
import torch.distributed as dist
from torch.utils.data import Dataset

from wsld.data.lmdb_files import first_line, no_space, reading
from wsld.data.sampling import sample_seed
from wsld.out_folder import LOCK_NAME, TakenFolder, take_folder
from wsld.errors import DataError, UserError
from wsld.runtime import (
    Runtime, amp_dtype_for, autocast, broadcast_object, compile_module, loader_workers, seed_everything, set_cpu_threads,
    use_channels_last,
)
from wsld.soft_labels.crops import CropRecorder, is_sample
from wsld.soft_labels.store import (
    COMPLETE_KEY, FINISH_HINT, FORMAT, FORMAT_VERSION, IDENTITY_KEYS, META_KEY, PRECISIONS, REMAKE_HINT, crop_data_config, encode_value,
    image_count, image_key, read_meta, record_dtype, records_from_logits, state_sha256, targets_sha256,
)  # fmt: skip

T = TypeVar("T")
Log = Callable[[str], None]


class ImageCrops(Dataset):
    """Item ``i``: all K training crops of image ``i`` with their boxes and flips, or the reason it is unreadable."""

    def __init__(self, dataset: Dataset, crops: int, seed: int):
        self.recorder = CropRecorder(dataset)
        self.dataset = dataset
        self.crops, self.seed = crops, seed

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, i: int):
        label = int(self.dataset.targets[i])  # type: ignore[attr-defined]
        images, params = [], []
        for k in range(self.crops):
            item, p = self.recorder(i, sample_seed(self.seed, k, i))
            if p is None or not is_sample(item):
                return i, None, label, None, str(getattr(item, "error", item))
            images.append(item[0])
            params.append(p)
        return i, torch.stack(images), label, torch.tensor(params, dtype=torch.int32), None


def keep_list(items: list) -> list:
    """Collate that keeps a batch's ``ImageCrops`` items as they are (unreadable ones included)."""
    return items


def plan_batches(count: int, have: set[int], images_per_batch: int) -> list[list[int]]:
    """The images still to do, as the fixed partition of ``range(count)`` into runs of
    ``images_per_batch`` (the same batches for any number of processes and after any resume)."""
    out = []
    for start in range(0, count, images_per_batch):
        todo = [i for i in range(start, min(count, start + images_per_batch)) if i not in have]
        if todo:
            out.append(todo)
    return out


def on_main(rt: Runtime, fn: Callable[[], T]) -> T:
    """``fn()`` on rank 0, its result on every rank; a ``UserError`` there is raised on every rank
    (so no rank waits for a writer that has stopped)."""
    result, error = None, None
    if rt.is_main:
        try:
            result = fn()
        except UserError as e:
            error = e
    result, message = broadcast_object(rt, (result, str(error) if error is not None else None))
    if error is not None:
        raise error
    if message is not None:
        raise UserError(message)
    return result  # type: ignore[return-value]


def default_store_path(cfg, crops: int, topk: int) -> Path:
    """``<dataset root>/soft_labels/<split>_<teacher>_K<crops>_top<k>``: the dataset root is
    ``data.data_path`` for folder and list data, and the folder above it for LMDBs (``ROOT/lmdb``
    holds packed splits only, so that ``wsld data verify ROOT/lmdb`` checks each of them)."""
    if cfg.data.format == "builtin":
        raise UserError("give --out PATH: built-in datasets have no data folder to put the soft labels beside")
    root = Path(os.path.abspath(os.path.expanduser(str(cfg.data.data_path))))
    if cfg.data.format == "lmdb":
        root = root.parent
    teacher = cfg.model.teacher.replace("/", "_").replace(":", "_")
    return root / "soft_labels" / f"{cfg.data.train_split}_{teacher}_K{crops}_top{topk}"


def check_arguments(cfg, crops: int, topk: int, precision: str) -> None:
    if crops < 1:
        raise UserError(f"--crops must be >= 1, got {crops}")
    if topk < 1:
        raise UserError(f"--topk must be >= 1, got {topk}")
    if precision not in PRECISIONS:
        raise UserError(f"--precision must be one of {', '.join(PRECISIONS)}, got {precision}")
    if cfg.model.teacher_bn_mode != "eval":
        raise UserError(
            "model.teacher_bn_mode=train uses batch statistics, so a crop's output depends on its batch and cannot be "
            "stored: set model.teacher_bn_mode=eval"
        )


def check_folder(out: Path) -> None:
    """A store folder holds the LMDB's two files (and the lock) only."""
    others = sorted(n for n in os.listdir(out) if n not in ("data.mdb", "lock.mdb", LOCK_NAME))
    if others and not (out / "data.mdb").is_file():
        raise UserError(f"--out {out} is a folder that holds other files ({', '.join(others[:3])}): give a new or empty folder")


def open_store(out: Path, meta: dict, est_bytes: int):
    """The LMDB at ``out`` (locked by the caller) opened for writing, its metadata written or checked
    against ``meta``, and the indices already stored."""
    import lmdb

    from wsld.data.identity import identity_difference
    from wsld.data.lmdb_files import check_data_file, damaged
    from wsld.data.lmdb_reader import release_env

    check_folder(out)
    release_env(out)  # a read-only handle of this process would block the writer
    remedy = f"remove {out} and run the same command again to remake it"
    if (out / "data.mdb").is_file():
        check_data_file(out, remedy)  # a truncated file would be a SIGBUS once mapped
    try:
        env = lmdb.open(str(out), map_size=est_bytes + (64 << 20), subdir=True, readahead=False, meminit=False)
    except lmdb.Error as e:
        if no_space(e, out):
            raise DataError(f"cannot create the soft-label store {out}: the disk is full ({first_line(e)})") from None
        raise damaged(out, e, remedy) from None
    try:
        old, _ = read_meta(env, out)
        if old is None and env.stat()["entries"] > 0:
            raise UserError(f"--out {out} is an LMDB but not a soft-label store: choose another folder")
        if old is not None:
            diff = [k for k in IDENTITY_KEYS if old.get(k) != meta.get(k)]
            if old.get("data_identity") not in (None, meta.get("data_identity")):
                diff.append("data (" + (identity_difference(old["data_identity"], meta["data_identity"], ("train",)) or "other") + ")")
            if diff:
                raise UserError(f"{out} holds soft labels made with other {', '.join(diff)}: remove it or choose another --out")
        else:
            write_values(env, {}, out, {META_KEY: json.dumps(meta).encode()})
        with reading(out, REMAKE_HINT), env.begin() as txn:
            have = {struct.unpack(">Q", k)[0] for k in txn.cursor().iternext(keys=True, values=False) if len(k) == 8}
    except BaseException:
        env.close()
        raise
    return env, have


def write_values(env, values: dict[int, bytes], out: Path, extra: Optional[dict[bytes, bytes]] = None) -> None:
    """One committed transaction (grown until the map holds it). A full disk is a DataError: the
    transaction is dropped whole, so the same command resumes once there is room."""
    import lmdb

    while True:
        try:
            with env.begin(write=True) as txn:
                for i, v in values.items():
                    txn.put(image_key(i), v)
                for k, v in (extra or {}).items():
                    txn.put(k, v)
            return
        except lmdb.MapFullError:
            env.set_mapsize(env.info()["map_size"] * 2)
        except lmdb.Error as e:
            raise write_error(out, e) from None


def write_error(out: Path, e: BaseException) -> DataError:
    why = "the disk is full" if no_space(e, out) else "a write failed"
    return DataError(f"cannot write the soft-label store {out}: {why} ({first_line(e)}); make room, then {FINISH_HINT} "
                     "(what is written is kept)")


def finish_store(env, out: Path, count: int) -> int:
    """Write the completion key once every image is stored; returns the number of unreadable images."""
    import lmdb

    entries = image_count(env, out)
    if entries != count:
        raise DataError(f"{out}: {entries} of {count} images stored after the pass; {FINISH_HINT}")
    with reading(out, REMAKE_HINT), env.begin() as txn:
        bad = sum(1 for k, v in txn.cursor() if len(k) == 8 and len(v) == 0)
    done = json.dumps({"count": count, "unreadable": bad, "time": round(time.time(), 3)}).encode()
    write_values(env, {}, out, {COMPLETE_KEY: done})
    try:
        env.sync(True)
    except lmdb.Error as e:
        raise write_error(out, e) from None
    return bad


def make_soft_labels(
    cfg, out: Path, crops: int, topk: int = 10, precision: str = "float16", batch_size: Optional[int] = None,
    log: Log = lambda m: print(f"[wsld] {m}", file=sys.stderr, flush=True), rt: Optional[Runtime] = None,
) -> Optional[dict[str, Any]]:
    """Write (or finish) the soft-label store ``out``, on this process or, under torchrun, on all
    ranks of ``rt`` together. Returns a summary (counts, sizes) on rank 0, None on the others.

    The batches are fixed (``plan_batches``), so the teacher sees the same batches for any number
    of processes and the records are the same bytes; rank ``r`` of ``W`` runs batches
    ``r, r + W, ...``. Rank 0 is the only writer: each round it gathers the W batches' records
    (``all_gather_object``) and commits them in one transaction, so a killed run leaves whole
    batches behind and the same command, on any number of processes, finishes it.
    """
    from wsld.runtime import setup_runtime

    check_arguments(cfg, crops, topk, precision)
    rt = rt or setup_runtime()
    say: Log = log if rt.is_main else (lambda m: None)
    out = Path(os.path.expanduser(str(out)))
    held: list[TakenFolder] = []  # rank 0's lock on the folder, taken before anything else

    def take() -> None:
        held.append(take_folder(out, "soft-label store"))
        check_folder(out)

    try:
        on_main(rt, take)
        return _make(cfg, out, crops, topk, precision, batch_size, say, rt)
    finally:
        for taken in held:
            taken.release()


def _make(cfg, out: Path, crops: int, topk: int, precision: str, batch_size: Optional[int], say: Log, rt: Runtime):
    """``make_soft_labels`` once the folder is taken."""
    from tqdm import tqdm

    from wsld.data.build import build_datasets
    from wsld.data.identity import data_identity
    from wsld.engine.step import BatchNormalizer
    from wsld.models import build_model
    from wsld.teachers.live import set_teacher_bn_mode
    from wsld.teachers.training import ensure_teacher

    set_cpu_threads(cfg, rt)
    seed_everything(cfg.train.seed)
    train_ds, val_ds, info = build_datasets(cfg.data, seed=cfg.train.seed)
    data = broadcast_object(rt, data_identity(train_ds, val_ds) if rt.is_main else None)  # the teacher cache key takes it
    if not cfg.data.augment and crops > 1:
        say(f"data.augment=false: all {crops} crops of an image are the same; --crops 1 stores the same information")
    if topk > info.num_classes:
        say(f"--topk {topk} is more than the {info.num_classes} classes: storing all {info.num_classes}")
        topk = info.num_classes
    weights = ensure_teacher(cfg, rt, say, data)
    teacher = build_model(cfg.model.teacher, info.num_classes, in_channels=info.in_channels, weights=weights, role="teacher")
    dev = rt.device
    channels_last = use_channels_last(cfg.model.channels_last, dev)
    teacher.to(dev, memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    set_teacher_bn_mode(teacher, "eval")
    forward = compile_module(teacher) if cfg.model.compile else teacher
    amp = amp_dtype_for(cfg.train.amp, dev)
    normalize = BatchNormalizer(info.mean, info.std, dev, channels_last)
    n = len(train_ds)
    dtype = record_dtype(topk, info.num_classes, precision)
    meta = {
        "format": FORMAT, "version": FORMAT_VERSION, "crops": crops, "topk": topk, "precision": precision,
        "num_classes": info.num_classes, "classes": list(info.classes), "count": n,
        "teacher": cfg.model.teacher, "teacher_weights": str(weights), "teacher_sha256": state_sha256(teacher),
        "seed": cfg.train.seed, "data": crop_data_config(cfg.data), "targets_sha256": targets_sha256(train_ds),
        "amp": str(amp), "record_bytes": dtype.itemsize,
        "data_identity": {k: data[k] for k in ("format", "classes", "train")},  # what a run checks (teachers.stored)
    }  # fmt: skip
    per_image = crops * dtype.itemsize
    # LMDB stores small values inline (~16 B overhead); bigger ones on whole overflow pages
    est = per_image + 64 if per_image < 1500 else (per_image // 4096 + 2) * 4096
    per_batch = max(1, (batch_size or cfg.data.batch_size) // crops)
    env = None

    def start() -> list[list[int]]:
        nonlocal env
        env, have = open_store(out, meta, int(n * est * 1.25))
        if have:
            say(f"{out}: {len(have)} of {n} images already done, {n - len(have)} to go")
        return plan_batches(n, have, per_batch)

    try:
        batches = on_main(rt, start)
        todo = sum(len(b) for b in batches)
        say(
            f"soft labels: {n} images x {crops} crops, teacher {cfg.model.teacher} ({weights}), top-{topk} in {precision}, "
            f"device={dev}, amp={amp}, {rt.world_size} process(es) -> {out}"
        )
        mine = batches[rt.rank :: rt.world_size]
        workers = loader_workers(cfg.data.workers)
        loader = iter(torch.utils.data.DataLoader(
            ImageCrops(train_ds, crops, cfg.train.seed), batch_sampler=mine, num_workers=workers,
            collate_fn=keep_list, prefetch_factor=4 if workers > 0 else None,
        ))  # fmt: skip
        rounds = -(-len(batches) // rt.world_size)
        bar = tqdm(total=todo, desc="soft labels", unit="img", disable=not (cfg.train.progress and rt.is_main), mininterval=1.0)
        with torch.no_grad():
            for r in range(rounds):
                items = next(loader) if r < len(mine) else []
                part = crop_records(items, forward, normalize, dev, amp, crops, topk, precision, train_ds)
                parts: list[Any] = [part]
                if rt.distributed:
                    parts = [None] * rt.world_size
                    dist.all_gather_object(parts, part)
                if rt.is_main:
                    for m in (m for _, messages in parts for m in messages):
                        say(m)
                    bar.update(sum(len(values) for values, _ in parts))
                on_main(rt, lambda: write_values(env, {i: v for values, _ in parts for i, v in values.items()}, out))
        bar.close()
        bad = on_main(rt, lambda: finish_store(env, out, n))
    finally:
        if env is not None:
            env.close()
    if not rt.is_main:
        return None
    size = (out / "data.mdb").stat().st_size
    return {
        "path": str(out), "images": n, "new_images": todo, "crops": crops, "topk": topk, "precision": precision,
        "record_bytes_per_image": per_image, "file_bytes": size, "file_bytes_per_image": size / max(1, n),
        "unreadable": bad, "processes": rt.world_size,
    }  # fmt: skip


def crop_records(
    items: list, teacher: torch.nn.Module, normalize: Callable, dev: torch.device, amp: Optional[torch.dtype],
    crops: int, topk: int, precision: str, dataset: Dataset,
) -> tuple[dict[int, bytes], list[str]]:
    """One batch of ``ImageCrops`` items -> (image index -> its K packed records, log lines);
    an unreadable image gets an empty value."""
    values: dict[int, bytes] = {}
    messages = []
    good = [it for it in items if it[1] is not None]
    for it in items:
        if it[1] is None:
            name = dataset.describe(it[0]) if hasattr(dataset, "describe") else it[0]
            messages.append(f"image {it[0]} ({name}) unreadable, stored without crops: {it[4]}")
            values[it[0]] = b""
    if good:
        x = normalize(torch.cat([it[1] for it in good]))
        with autocast(dev, amp):
            logits = teacher(x)
        y = torch.tensor([it[2] for it in good for _ in range(crops)], device=dev)
        rec = records_from_logits(logits, y, topk, precision)
        rec["box"] = torch.cat([it[3][:, :4] for it in good]).numpy()
        rec["flip"] = torch.cat([it[3][:, 4] for it in good]).numpy()
        for j, it in enumerate(good):
            values[it[0]] = encode_value(it[0], rec[j * crops : (j + 1) * crops])
    return values, messages


def human_size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"
