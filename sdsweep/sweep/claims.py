"""Who runs what: claims, heartbeats and take-overs, kept in the Optuna storage.

Claim rule ("lowest ticket wins")
---------------------------------
A process that wants a training run creates a *ticket*: the Optuna trial of the run's first
grid point, created RUNNING with its run key, owner and first heartbeat as user attributes in ONE
``storage.create_new_trial`` call. It then re-reads the study. It has won the run when no other
live (RUNNING, heart-beating, not superseded) trial of the same run key has a lower trial number
and none of the run's points has meanwhile been decided. A loser marks its ticket superseded and
fails it (it never counts as a result) and plans again.

Why this is atomic on each backend (read in Optuna 5's source):
- RDB (PostgreSQL, MySQL): ``_create_new_trial`` first takes ``SELECT ... FOR UPDATE`` on the
  study row, then inserts the trial and computes its number inside that transaction. Trial
  creations of one study are therefore serialised: when my creation has committed, every ticket
  with a lower number has committed before it, so my re-read sees all of them.
- SQLite: one writer at a time for the whole file; the insert and the number are computed inside
  the write transaction, so the same argument holds. (WAITING->RUNNING via ``enqueue_trial`` +
  ``ask`` is NOT atomic on SQLite, optuna#4002: pysqlite reads the WAITING state outside the write
  transaction. We never use enqueue/ask for grid points.)
- JournalStorage: every operation is appended to one log under the backend's lock and replayed in
  log order; trial numbers are log order, and a process syncs the log before reading.

Liveness is a heartbeat (unix time) written into the trial's user attributes every
``sweep.heartbeat_interval`` seconds. A RUNNING trial whose heartbeat is older than
``sweep.grace_period`` is taken over: failed with its reason and, unless the point has used up
``sweep.max_retries``, superseded so that its point is planned again; the run resumes from its last
milestone checkpoint. Host names and PIDs play no part (clocks are assumed NTP-synchronised).
"""

from __future__ import annotations

import threading
import time
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from sdsweep.config.schema import SweepConfig
from sdsweep.study.store import (
    FAIL_REASON,
    GRID_POINT,
    INTERRUPTED,
    RUN_KEY,
    SUPERSEDED,
    StudyHandle,
)

OWNER = "owner"  # "<host> worker <n> <token>": who runs the trial (for people; liveness ignores it)
HEARTBEAT = "heartbeat"  # unix time of the owner's last sign of life
CRASHED = "crashed"  # the owner died during this trial: counts against sweep.max_retries
HANDED_BACK = "handed_back"  # stopped by Ctrl-C/SIGTERM: queued again, costs no retry


def is_superseded(frozen: FrozenTrial) -> bool:
    return bool(frozen.user_attrs.get(SUPERSEDED))


class Claims:
    def __init__(self, handle: StudyHandle, sweep: SweepConfig, owner: str):
        self.handle = handle
        self.sweep = sweep
        self.owner = owner

    # ---- liveness ---------------------------------------------------------------------------------
    def last_beat(self, frozen: FrozenTrial) -> float:
        beat = frozen.user_attrs.get(HEARTBEAT)
        if isinstance(beat, (int, float)):
            return float(beat)
        start = frozen.datetime_start
        return start.timestamp() if start else 0.0

    def is_stale(self, frozen: FrozenTrial, now: float | None = None) -> bool:
        return (now or time.time()) - self.last_beat(frozen) > self.sweep.grace_period

    def is_live(self, frozen: FrozenTrial, now: float | None = None) -> bool:
        return (
            frozen.state == TrialState.RUNNING
            and not is_superseded(frozen)
            and not self.is_stale(frozen, now)
        )

    # ---- claiming ---------------------------------------------------------------------------------
    def create_ticket(
        self, params: dict[str, Any], distributions: dict[str, Any], attrs: dict[str, Any]
    ) -> int:
        """A RUNNING trial with its identity in one storage call; returns its number."""
        template = optuna.trial.create_trial(
            state=TrialState.RUNNING,
            params=params,
            distributions=distributions,
            user_attrs={**attrs, OWNER: self.owner, HEARTBEAT: time.time()},
        )
        trial_id = self.handle.storage.create_new_trial(self.handle.study_id, template_trial=template)
        return self.handle.storage.get_trial_number_from_id(trial_id)

    def won(self, ticket: int, run_key: str, point_keys: set[str], decided: set[str]) -> bool:
        """The lowest-ticket rule of the module docstring, on a fresh read of the study."""
        if point_keys & decided:
            return False
        now = time.time()
        for frozen in self.handle.trials(states=(TrialState.RUNNING,)):
            if frozen.number >= ticket or not self.is_live(frozen, now):
                continue
            if frozen.user_attrs.get(RUN_KEY) == run_key or frozen.user_attrs.get(GRID_POINT) in point_keys:
                return False
        return True

    def retire(self, number: int, reason: str, **attrs: Any) -> bool:
        """Attributes first (a finished trial can no longer change), then FAIL. False if already finished."""
        for key, value in {**attrs, FAIL_REASON: reason[:2000]}.items():
            if not self.handle.set_attr(number, key, value):
                return False
        try:
            self.handle.study.tell(number, state=TrialState.FAIL)
        except (optuna.exceptions.UpdateFinishedTrialError, RuntimeError, ValueError):
            return False
        return True

    def lose(self, ticket: int) -> None:
        self.retire(ticket, "superseded: another worker claimed this run first", **{SUPERSEDED: True})

    def hand_back(self, numbers: list[int], why: str) -> int:
        handed = 0
        for number in numbers:
            reason = f"handed back ({why}); the next claimant resumes from the last checkpoint"
            handed += self.retire(number, reason, **{HANDED_BACK: True, SUPERSEDED: True})
        return handed

    def crashed(self, frozen: FrozenTrial, reason: str) -> bool:
        """The owner died: FAIL with the reason; superseded (so retried) while retries are left."""
        point = frozen.user_attrs.get(GRID_POINT)
        earlier = sum(
            1
            for t in self.handle.trials(states=(TrialState.FAIL,))
            if t.user_attrs.get(CRASHED)
            and t.user_attrs.get(GRID_POINT) == point
            and t.number != frozen.number
        )
        retry = earlier < self.sweep.max_retries
        if retry:
            reason += f" (retry {earlier + 1} of {self.sweep.max_retries})"
        attrs = {CRASHED: True, INTERRUPTED: True}
        if retry:
            attrs[SUPERSEDED] = True
        return self.retire(frozen.number, reason, **attrs)

    def reap_stale(self) -> int:
        """Take over trials whose heartbeat stopped, so their points are planned again."""
        now = time.time()
        reaped = 0
        for frozen in self.handle.trials(states=(TrialState.RUNNING,)):
            if not self.is_stale(frozen, now):
                continue
            if is_superseded(frozen):  # its owner died while retiring it: finish the job, no retry counted
                self.retire(frozen.number, str(frozen.user_attrs.get(FAIL_REASON) or "superseded"))
                continue
            silent = now - self.last_beat(frozen)
            owner = frozen.user_attrs.get(OWNER, "an earlier sweep process")
            reaped += self.crashed(
                frozen, f"interrupted: {owner} stopped sending heartbeats {silent:.0f}s ago (killed?)"
            )
        return reaped

    def running_of_token(self, token: str) -> list[FrozenTrial]:
        """RUNNING trials of one worker process (the driver's own bookkeeping, not liveness)."""
        return [
            t
            for t in self.handle.trials(states=(TrialState.RUNNING,))
            if f"[{token}]" in str(t.user_attrs.get(OWNER))
        ]


class Heartbeat:
    """A daemon thread that keeps the given RUNNING trials alive in the storage."""

    def __init__(self, handle: StudyHandle, interval: float):
        self.handle = handle
        self.interval = interval
        self.numbers: set[int] = set()
        self.lock = threading.Lock()
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._loop, name="sdsweep-heartbeat", daemon=True)
        self.thread.start()

    def watch(self, numbers: list[int]) -> None:
        with self.lock:
            self.numbers = set(numbers)

    def _loop(self) -> None:
        while not self.stopped.wait(self.interval):
            with self.lock:
                numbers = sorted(self.numbers)
            for number in numbers:
                try:
                    alive = self.handle.set_attr(number, HEARTBEAT, time.time())
                except Exception:  # a busy database: try again next beat
                    continue
                if not alive:
                    with self.lock:
                        self.numbers.discard(number)

    def stop(self) -> None:
        self.stopped.set()
