"""Who runs what: claims, heartbeats and take-overs, kept in the Optuna storage.

Claim rule ("lowest ticket wins")
---------------------------------
A process that wants a training run creates a *ticket*: the Optuna trial of the run's first
grid point, created RUNNING with its run key, owner and first heartbeat as user attributes in ONE
``storage.create_new_trial`` call. It then re-reads the study. It has won the run when no other
live (RUNNING, heart-beating, not superseded) trial of the same run key has a lower trial number
and none of the run's points has meanwhile been decided. A loser marks its ticket superseded and
fails it with the fate ``Fate.CLAIM_LOST`` (study/trial_tags.py; bookkeeping: it never counts as a
result, and no sdsweep view calls it a failure) and plans again.

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
``sweep.heartbeat_interval`` seconds. A RUNNING trial whose heartbeat stopped for ``sweep.grace_period``
is taken over: failed with its reason and, unless the point has used up ``sweep.max_retries``,
superseded so that its point is planned again; the run resumes from its last milestone checkpoint.
PIDs play no part, and no clock is compared across machines: a beat written on this machine (its
``host`` attribute names this host) is aged by this machine's clock, so a re-run after a kill takes
the run over at once; a beat written elsewhere counts as stopped only once this process has watched it
stand still for the grace period on its own monotonic clock, so a machine whose clock runs minutes
ahead never mistakes another machine's live run for a dead one.

The owner notices a take-over too: ``Heartbeat`` sees its trial finished by someone else (a process that
believed it dead, e.g. after the storage was unreachable for longer than the grace period) and the run
stops at its next step (``RunTakenOver``) instead of training on beside its new owner.
"""

from __future__ import annotations

import socket
import threading
import time
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from sdsweep import faults
from sdsweep.config.schema import SweepConfig
from sdsweep.study.store import StudyHandle
from sdsweep.study.trial_tags import HEARTBEAT, Fate, TrialTags, ending, fate_of_error


def host_name() -> str:
    """The host an sdsweep process reports (tests simulate a second machine: sdsweep/faults.py)."""
    return faults.host_override() or socket.gethostname()


def wall_clock() -> float:
    """This machine's unix time (tests simulate a machine whose clock is off, sdsweep/faults.py, to show
    that liveness never compares clocks across machines)."""
    return time.time() + faults.clock_offset()


class Claims:
    def __init__(
        self, handle: StudyHandle, sweep: SweepConfig, owner: str, token: str, host: str | None = None
    ):
        self.handle = handle
        self.sweep = sweep
        self.owner = owner
        self.token = token
        self.host = host or host_name()
        # Beats written on other machines: trial number -> (beat, monotonic time we first saw that beat).
        self._watched: dict[int, tuple[float, float]] = {}

    def identity(self) -> TrialTags:
        """The tags that make a trial ours: owner, token, host and a first heartbeat."""
        return TrialTags(owner=self.owner, token=self.token, host=self.host, heartbeat=wall_clock())

    # ---- liveness ---------------------------------------------------------------------------------
    def last_beat(self, frozen: FrozenTrial) -> float:
        beat = TrialTags.of(frozen).heartbeat
        if beat is not None:
            return beat
        start = frozen.datetime_start
        return start.timestamp() if start else 0.0

    def is_stale(self, frozen: FrozenTrial, now: float | None = None) -> bool:
        beat = self.last_beat(frozen)
        if TrialTags.of(frozen).host == self.host:  # our own clock wrote it: its age is meaningful
            return (now or wall_clock()) - beat > self.sweep.grace_period
        # Another machine's clock: stale only once we have watched this beat stand still long enough.
        seen_now = time.monotonic()
        seen = self._watched.get(frozen.number)
        if seen is None or seen[0] != beat:
            self._watched[frozen.number] = (beat, seen_now)
            return False
        return seen_now - seen[1] > self.sweep.grace_period

    def is_live(self, frozen: FrozenTrial, now: float | None = None) -> bool:
        return (
            frozen.state == TrialState.RUNNING
            and not TrialTags.of(frozen).superseded
            and not self.is_stale(frozen, now)
        )

    # ---- claiming ---------------------------------------------------------------------------------
    def create_ticket(
        self,
        params: dict[str, Any],
        distributions: dict[str, Any],
        tags: TrialTags,
        system_attrs: dict[str, Any] | None = None,
    ) -> int:
        """A RUNNING trial with its tags and identity in one storage call; returns its number."""
        template = optuna.trial.create_trial(
            state=TrialState.RUNNING,
            params=params,
            distributions=distributions,
            user_attrs={**tags.attrs(), **self.identity().attrs()},
            system_attrs=system_attrs,
        )
        trial_id = self.handle.storage.create_new_trial(self.handle.study_id, template_trial=template)
        return self.handle.storage.get_trial_number_from_id(trial_id)

    def won(self, ticket: int, run_key: str, point_keys: set[str], decided: set[str]) -> bool:
        """The lowest-ticket rule of the module docstring, on a fresh read of the study."""
        if point_keys & decided:
            return False
        now = wall_clock()
        for frozen in self.handle.trials(states=(TrialState.RUNNING,)):
            if frozen.number >= ticket or not self.is_live(frozen, now):
                continue
            tags = TrialTags.of(frozen)
            if tags.run_key == run_key or tags.grid_point in point_keys:
                return False
        return True

    def retire(self, number: int, tags: TrialTags) -> bool:
        """Tags first (a finished trial can no longer change), then FAIL. False if already finished."""
        if not self.handle.set_tags(number, tags):
            return False
        try:
            self.handle.study.tell(number, state=TrialState.FAIL)
        except (optuna.exceptions.UpdateFinishedTrialError, RuntimeError, ValueError):
            return False
        return True

    def lose(self, ticket: int) -> None:
        reason = "claim lost (bookkeeping, not a failure): another worker claimed this run first"
        self.retire(ticket, ending(Fate.CLAIM_LOST, reason, superseded=True))

    def hand_back(self, numbers: list[int], why: str) -> int:
        handed = 0
        for number in numbers:
            reason = f"handed back ({why}); the next claimant resumes from the last checkpoint"
            handed += self.retire(number, ending(Fate.HANDED_BACK, reason, superseded=True))
        return handed

    def refuse(self, numbers: list[int], reason: str, error: BaseException) -> None:
        """Trials whose run cannot be built (its config is invalid): FAIL for good, with the error's fate."""
        for number in numbers:
            self.retire(number, ending(fate_of_error(error), reason, error_type=type(error).__name__))

    def crashed(self, frozen: FrozenTrial, reason: str, fate: Fate = Fate.CRASHED) -> bool:
        """The owner died: FAIL with the reason; superseded (so retried) while retries are left."""
        point = TrialTags.of(frozen).grid_point
        earlier = 0
        for t in self.handle.trials(states=(TrialState.FAIL,)):
            tags = TrialTags.of(t)
            earlier += bool(
                tags.fate and tags.fate.died and tags.grid_point == point and t.number != frozen.number
            )
        retry = earlier < self.sweep.max_retries
        if retry:
            reason += f" (retry {earlier + 1} of {self.sweep.max_retries})"
        return self.retire(frozen.number, ending(fate, reason, superseded=retry))

    def reap_stale(self) -> int:
        """Take over trials whose heartbeat stopped, so their points are planned again."""
        now = wall_clock()
        reaped = 0
        running = self.handle.trials(states=(TrialState.RUNNING,))
        for number in set(self._watched) - {t.number for t in running}:
            del self._watched[number]  # finished: nothing more to watch
        for frozen in running:
            if not self.is_stale(frozen, now):
                continue
            tags = TrialTags.of(frozen)
            if tags.superseded:  # its owner died while retiring it: finish the job, no retry counted
                self.retire(
                    frozen.number, ending(tags.fate or Fate.ERROR, tags.fail_reason or "superseded", True)
                )
                continue
            owner = tags.owner or "an earlier sweep process"
            reaped += self.crashed(
                frozen,
                f"interrupted: {owner} sent no heartbeat for over {self.sweep.grace_period:g}s (killed?)",
                Fate.TAKEN_OVER,
            )
        return reaped

    def running_of_token(self, token: str) -> list[FrozenTrial]:
        """RUNNING trials of one worker process (the driver's own bookkeeping, not liveness)."""
        return [t for t in self.handle.trials(states=(TrialState.RUNNING,)) if TrialTags.of(t).token == token]


class RunTakenOver(RuntimeError):
    """Another process took this run over (it believed us dead): stop training it, record nothing."""


def taken_over(frozen: FrozenTrial) -> bool:
    """A trial of ours that someone else failed as crashed or stale while we were still running it."""
    fate = TrialTags.of(frozen).fate
    return frozen.state == TrialState.FAIL and fate is not None and fate.died


class Heartbeat:
    """A daemon thread that keeps the given RUNNING trials alive in the storage, and notices when one of
    them was taken over by another process (``lost``; the run then stops at its next step)."""

    def __init__(self, handle: StudyHandle, interval: float):
        self.handle = handle
        self.interval = interval
        self.numbers: set[int] = set()
        self.lost: set[int] = set()
        self.lock = threading.Lock()
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._loop, name="sdsweep-heartbeat", daemon=True)
        self.thread.start()

    def watch(self, numbers: list[int]) -> None:
        with self.lock:
            self.numbers = set(numbers)
            self.lost = set()

    def check_owned(self) -> None:
        """Raise ``RunTakenOver`` in the training thread once a watched trial was taken over."""
        if self.lost:
            raise RunTakenOver(
                f"trial(s) {', '.join(map(str, sorted(self.lost)))} were taken over by another process "
                "(it saw no heartbeat from us for longer than sweep.grace_period: was the storage "
                "unreachable?); this process stops the run and leaves it to its new owner"
            )

    def _loop(self) -> None:
        while not self.stopped.wait(self.interval):
            with self.lock:
                numbers = sorted(self.numbers)
            for number in numbers:
                try:
                    alive = self.handle.set_attr(number, HEARTBEAT, wall_clock())  # one key, every beat
                    lost = not alive and taken_over(self.handle.get_trial(number))
                except Exception:  # a busy or unreachable database: try again next beat
                    continue
                if not alive:
                    with self.lock:
                        if lost and number in self.numbers:  # still this run's, not a finished run's
                            self.lost.add(number)
                        self.numbers.discard(number)

    def stop(self) -> None:
        self.stopped.set()
