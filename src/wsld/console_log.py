"""The console log: what a training command prints (stdout and stderr, warnings and errors included, progress
bars left out) is also kept in ``log.txt`` of each run folder it trains into, on rank 0 only.

``capture`` wraps the command; ``attach`` is called once a run folder exists and is the run's (the
output printed before, such as notes and a teacher trained first, is written to it then); ``detached_after``
limits a run's file to the part of the command that trained it (a cached teacher's run). A log
file that cannot be written (disk full) is dropped with one warning; training goes on.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Iterator, Optional, TextIO

LOG_FILE = "log.txt"


class _Tee:
    """A console stream that also hands what is written to the log; everything else is the stream's."""

    def __init__(self, stream: TextIO, log: "ConsoleLog"):
        self._stream, self._log = stream, log

    def write(self, text: str) -> int:
        n = self._stream.write(text)
        self._log.record(text)
        return n

    def flush(self) -> None:
        self._stream.flush()

    def __getattr__(self, name: str):  # isatty, fileno, encoding ...: progress bars ask the real stream
        return getattr(self._stream, name)


class ConsoleLog:
    def __init__(self, header: str):
        self.text: list[str] = [header]
        self.files: dict[Path, TextIO] = {}

    def record(self, text: str) -> None:
        if not text or "\r" in text:  # a progress bar redrawing itself: not worth keeping
            return
        self.text.append(text)
        for path, f in list(self.files.items()):
            try:
                f.write(text)
                f.flush()
            except OSError as e:
                self._drop(path, e)

    def attach(self, path: Path, fresh: bool) -> None:
        path = Path(path)
        if path in self.files:
            return
        try:
            f = open(path, "w" if fresh else "a", encoding="utf-8")
            f.write("".join(self.text))
            f.flush()
        except OSError as e:
            print(f"[wsld] warning: cannot keep the console output in {path}: {e.strerror or e}", file=sys.__stderr__, flush=True)
            return
        self.files[path] = f

    def detach(self, path: Path) -> None:
        f = self.files.pop(Path(path), None)
        if f is not None:
            with contextlib.suppress(OSError):
                f.close()

    def _drop(self, path: Path, e: OSError) -> None:
        self.files.pop(path, None)
        print(f"[wsld] warning: stopped keeping the console output in {path}: {e.strerror or e}", file=sys.__stderr__, flush=True)


_active: Optional[ConsoleLog] = None


@contextlib.contextmanager
def capture(enabled: bool, argv: list[str]) -> Iterator[None]:
    """While the block runs, keep what is printed, for the run folders attached later (rank 0 only)."""
    global _active
    if not enabled or _active is not None or int(os.environ.get("RANK", "0") or 0) != 0:
        yield
        return
    started = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    log = ConsoleLog(f"# wsld {shlex.join(argv)}    (started {started})\n")
    out, err = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = _Tee(out, log), _Tee(err, log)  # type: ignore[assignment]
    _active = log
    try:
        yield
    finally:
        sys.stdout, sys.stderr = out, err
        _active = None
        for path in list(log.files):
            log.detach(path)


def attach(run_dir: Path, fresh: bool) -> None:
    """Keep the command's console output in ``run_dir/log.txt`` from now on, with what was printed so far
    (``fresh``: a new file; else appended, as a resumed run's). Nothing happens outside ``capture``."""
    if _active is not None:
        _active.attach(Path(run_dir) / LOG_FILE, fresh)


@contextlib.contextmanager
def detached_after() -> Iterator[None]:
    """Log files attached inside the block stop receiving output when it ends."""
    before = set(_active.files) if _active is not None else set()
    try:
        yield
    finally:
        if _active is not None:
            for path in set(_active.files) - before:
                _active.detach(path)
