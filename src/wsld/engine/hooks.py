"""Test hooks, read from the environment (docs/engine.md): abrupt stops, slow steps, a rank lost without warning."""

from __future__ import annotations

import os
import signal
import sys

from wsld.runtime import Runtime, barrier

# Test hook (docs/engine.md): WSLD_STOP_AFTER_STEPS=N makes the student run exit abruptly
# (os._exit, no cleanup, like a crash) right after this process has taken N optimizer steps and
# written any checkpoint due at that step. Used by the resume and reliability tests.
STOP_AFTER_STEPS_ENV = "WSLD_STOP_AFTER_STEPS"
STOP_EXIT_CODE = 99
# test hook: WSLD_TEST_SLOW_STEP=<seconds> sleeps after each step, so a test can signal a run mid-epoch
SLOW_STEP_ENV = "WSLD_TEST_SLOW_STEP"
# test hook: WSLD_TEST_KILL9=<rank>:<steps> makes that rank kill -9 itself after <steps> steps, in the
# first attempt of a torchrun elastic job only (TORCHELASTIC_RESTART_COUNT 0)
KILL9_ENV = "WSLD_TEST_KILL9"


def stop_after_steps(role: str) -> int:
    """``WSLD_STOP_AFTER_STEPS=N`` stops the student run, ``teacher:N`` the teacher phase."""
    value = os.environ.get(STOP_AFTER_STEPS_ENV) or ""
    want, _, n = value.rpartition(":")
    return int(n or 0) if (want or "student") == role else 0


def maybe_kill9(rt: Runtime, steps_here: int) -> None:
    """The ``WSLD_TEST_KILL9`` hook (a worker lost without warning, for the elastic-restart test)."""
    value = os.environ.get(KILL9_ENV)
    if not value or int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0:
        return
    rank, steps = (int(v) for v in value.split(":"))
    if rt.rank == rank and steps_here >= steps:
        os.kill(os.getpid(), signal.SIGKILL)



def simulated_crash(rt: Runtime, global_step: int, say) -> None:
    """The WSLD_STOP_AFTER_STEPS hook: leave like a crash (no summary, no cleanup).

    Under DDP the ranks first meet at a barrier, so rank 0 has finished writing the checkpoint
    due at this step and the hook always stops the run at the same point."""
    say(f"{STOP_AFTER_STEPS_ENV}: stopping abruptly after global step {global_step} (test hook)")
    barrier(rt)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(STOP_EXIT_CODE)
