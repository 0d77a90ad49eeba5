"""Test plumbing, in one place: injected faults and a simulated machine.

The tests start real processes (drivers, pool workers, DDP ranks), so they switch these on through the
environment of the process they start; a test inside one process can patch this module instead. Nothing
else in sdsweep reads these variables, and with none set every function here is a no-op: production
code calls ``fault``/``kill_at`` at named points and never knows why.

- ``SDSWEEP_FAULT=<point>``: ``after_record`` SIGKILLs the process right after a trial's metrics.json is
  written and before Optuna is told (keep_best_k and resume must handle that window); ``rank_crash``
  makes a DDP rank raise mid-run.
- ``SDSWEEP_HOST=<name>``: the host this process reports (a second machine, simulated).
- ``SDSWEEP_CLOCK_OFFSET=<seconds>``: a machine whose clock is off (liveness never compares clocks).

A leaf module: it imports nothing of ours.
"""

from __future__ import annotations

import os
import signal

FAULT = "SDSWEEP_FAULT"
HOST = "SDSWEEP_HOST"
CLOCK_OFFSET = "SDSWEEP_CLOCK_OFFSET"


def fault(point: str) -> bool:
    """Whether the fault named ``point`` is switched on (read each time: a forked worker sets its env late)."""
    return os.environ.get(FAULT) == point


def kill_at(point: str) -> None:
    """SIGKILL this process here when the fault ``point`` is on: a crash nothing can clean up after."""
    if fault(point):
        os.kill(os.getpid(), signal.SIGKILL)


def host_override() -> str | None:
    return os.environ.get(HOST) or None


def clock_offset() -> float:
    return float(os.environ.get(CLOCK_OFFSET) or 0.0)
