"""The run directory: taking it (lock, then checks), metrics.jsonl + TensorBoard (and log.txt, wsld.console_log), write probes, default names, and which config keys a resume may change."""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from wsld import console_log
from wsld.errors import UserError
from wsld.files import atomic_write_text
from wsld.locks import DirLock

if TYPE_CHECKING:
    from wsld.runtime import Runtime

# keys that may differ between a run's saved config and the config of a resumed run: where the
# data lives, how fast it is read, how often we log or checkpoint, and speed options that do not
# change what is computed beyond float rounding (docs/engine.md, "Resume"; moved weight files and a
# new train.epochs are checked by wsld.engine.resume)
RESUME_SAFE_KEYS = {
    "data.data_path", "data.workers", "data.val_batch_size", "train.progress", "train.log_every", "train.threads",
    "model.teacher_cache", "model.compile", "model.channels_last", "checkpoint.every_steps", "checkpoint.keep_every_epochs",
}  # fmt: skip


class MetricsLog:
    """JSON-lines metrics (rank 0 only) plus TensorBoard scalars; truncatable on resume."""

    def __init__(self, run_dir: Path, enabled: bool, purge_step: Optional[int] = None, keep_lines: Optional[int] = None):
        self.enabled = enabled
        self.path = run_dir / "metrics.jsonl"
        self.lines = 0
        self.tb = None
        if not enabled:
            return
        console_log.attach(run_dir, fresh=not purge_step)  # log.txt beside it: the command's console output
        if keep_lines is not None and self.path.exists():
            kept = self.path.read_text(encoding="utf-8").splitlines()[:keep_lines]
            atomic_write_text(self.path, "".join(line + "\n" for line in kept))
        self.lines = len(self.path.read_text(encoding="utf-8").splitlines()) if self.path.exists() else 0
        self._f = open(self.path, "a", encoding="utf-8")
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(run_dir / "tb"), purge_step=purge_step)
        except Exception as e:  # tensorboard missing or broken: keep the JSON log
            print(f"wsld: TensorBoard logging off ({e})", file=sys.stderr)

    def write(self, record: dict[str, Any], step: Optional[int] = None) -> None:
        if not self.enabled:
            return
        record = {"time": round(time.time(), 3), **record}
        try:
            self._f.write(json.dumps(record) + "\n")
            self._f.flush()
            os.fsync(self._f.fileno())
        except OSError as e:  # disk full or gone: the checkpoints are atomic, so the last one is intact
            raise UserError(
                f"could not write {self.path} ({e.strerror or e}); the last checkpoint in {self.path.parent} is intact: "
                f"free space, then continue with wsld train --resume {self.path.parent}"
            ) from None
        self.lines += 1
        if self.tb is not None and step is not None:
            kind = record.get("kind", "x")
            try:
                for k, v in record.items():
                    if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in ("epoch", "step", "global_step", "time"):
                        self.tb.add_scalar(f"{kind}/{k}", v, step)
            except Exception as e:  # TensorBoard's writer failed (disk full...): metrics.jsonl goes on
                print(f"[wsld] warning: TensorBoard logging off ({str(e).splitlines()[0] if str(e) else type(e).__name__})", file=sys.stderr)
                self.tb = None

    def close(self) -> None:
        if self.enabled and not self._f.closed:
            try:
                self._f.close()
                if self.tb is not None:
                    self.tb.close()
            except Exception:  # closing after a failed write (disk full): nothing more to save
                pass


def write_probe(run_dir: Path, nbytes: int) -> None:
    """Fail before training if the run directory cannot hold a checkpoint (unwritable, disk full)."""
    probe = run_dir / ".write_probe"
    try:
        with open(probe, "wb") as f:
            chunk = b"\0" * (1 << 20)
            left = nbytes
            while left > 0:
                f.write(chunk[: min(left, len(chunk))])
                left -= len(chunk)
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        raise UserError(f"run directory {run_dir} cannot hold a {nbytes / 2**20:.0f} MiB checkpoint ({e.strerror or e}): free space or choose another --out") from None
    finally:
        try:
            probe.unlink()
        except OSError:
            pass


def early_write_probe(run_dir: Path, nbytes: int = 1 << 20) -> None:
    """Fail in the first second, before data, teacher training or the run directory exist, when
    ``run_dir`` cannot be created or written: a path through a regular file, a read-only file
    system, a full disk, no permission. Leaves nothing behind (an unnamed temp file in the nearest
    existing folder). ``write_probe`` checks the full checkpoint size once the model is built."""
    folder = Path(os.path.abspath(run_dir))
    while not os.path.lexists(folder) and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        raise UserError(f"cannot create run directory {run_dir}: {folder} is not a folder (choose another --out)")
    try:
        with tempfile.TemporaryFile(dir=folder) as f:
            f.write(b"\0" * nbytes)
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        raise UserError(f"run directory {run_dir} is not writable ({e.strerror or e}): free space or choose another --out") from None


class RunDirClaim:
    """The run directory taken before any work (``with RunDirClaim(...)``): rank 0 makes the folder
    and takes its lock, then the folder is checked under the lock, so that of two processes started
    together into one folder only one runs; every rank gets the refusal (one line, the holder's pid).

    ``fresh``: a new run, refused over a folder that holds one (``last.pt`` or ``summary.json``).
    On exit the lock goes, and so do the folders made here if nothing was written in them.
    """

    def __init__(self, run_dir: Path, rt: "Runtime", *, fresh: bool):
        self.run_dir, self.rt, self.fresh = Path(run_dir), rt, fresh
        self.lock = DirLock(self.run_dir, remove_on_release=True)
        self.made: list[Path] = []

    def __enter__(self) -> "RunDirClaim":
        from wsld.runtime import broadcast_object  # torch: only a run gets here

        why = None
        if self.rt.is_main:
            try:
                early_write_probe(self.run_dir)  # before any folder is made: nothing is left behind
                self.made = _make_folders(self.run_dir)
                if not self.lock.try_acquire():
                    why = str(self.lock.in_use(f"run directory {self.run_dir}"))
                elif self.fresh and ((self.run_dir / "last.pt").exists() or (self.run_dir / "summary.json").exists()):
                    why = f"{self.run_dir} already holds a run: use --resume {self.run_dir} to continue it, or another --out"
            except UserError as e:
                why = str(e)
            except OSError as e:  # the lock file cannot be made (no permission...)
                why = f"cannot use run directory {self.run_dir} ({e.strerror or e}): choose another --out"
        why = broadcast_object(self.rt, why)
        if why:
            self.__exit__()
            raise UserError(why)
        return self

    def __exit__(self, *exc: Any) -> None:
        self.lock.release()
        for f in self.made:  # deepest first; one holding anything stays, and so do those above it
            try:
                f.rmdir()
            except OSError:
                break
        self.made = []


def _make_folders(folder: Path) -> list[Path]:
    """``mkdir -p folder``; returns the folders it made, deepest first."""
    made = []
    f = Path(os.path.abspath(folder))
    while not os.path.lexists(f) and f != f.parent:
        made.append(f)
        f = f.parent
    try:
        Path(folder).mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create run directory {folder} ({e.strerror or e}): choose another --out") from None
    return made


def default_run_dir(dataset: str, loss: str, student: str) -> Path:
    """``runs/<timestamp>-<dataset>-<loss>-<student>``, with ``-2``, ``-3``... when that second's folder exists."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path = Path("runs") / f"{stamp}-{dataset}-{loss}-{student}"
    n = 1
    while path.with_name(path.name + (f"-{n}" if n > 1 else "")).exists():
        n += 1
    return path.with_name(path.name + (f"-{n}" if n > 1 else ""))


def config_value(d: dict, key: str) -> Any:
    """The value of dotted ``key`` (as ``config_diff`` names it) in a config dict; None where absent."""
    for part in key.split("."):
        d = d.get(part) if isinstance(d, dict) else None
    return d


def config_diff(a: dict, b: dict, prefix: str = "") -> list[str]:
    keys = []
    for k in sorted(set(a) | set(b)):
        va, vb = a.get(k), b.get(k)
        if isinstance(va, dict) and isinstance(vb, dict):
            keys += config_diff(va, vb, f"{prefix}{k}.")
        elif va != vb:
            keys.append(f"{prefix}{k}")
    return keys
