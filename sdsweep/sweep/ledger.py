"""What the study holds, as the sweep counts it: which trials are results, and which grid points are
decided (have an outcome that stands) or live (being trained by a process with a fresh heartbeat).

Read from the storage on every call, so every process on every machine counts the same study the same
way; the only writes are per-trial ``superseded`` marks, one key each, so concurrent workers never lose
each other's marks.
"""

from __future__ import annotations

import optuna
from optuna.trial import TrialState

from sdsweep.config.schema import SweepConfig
from sdsweep.study.plan import point_key
from sdsweep.study.store import StudyHandle
from sdsweep.study.trial_tags import SUPERSEDED, Fate, TrialTags
from sdsweep.sweep.claims import Claims, wall_clock


class StudyLedger:
    def __init__(self, handle: StudyHandle, sweep: SweepConfig, claims: Claims, retry_below: int):
        self.handle = handle
        self.study = handle.study
        self.sweep = sweep
        self.claims = claims
        # sweep.retry_failed re-runs failures of EARLIER invocations only (trial numbers below this),
        # never a failure of this sweep, which would loop forever.
        self.retry_below = retry_below

    def superseded(self) -> set[int]:
        """Trials that are not results: lost claims, handed-back and retried attempts, retry_failed."""
        marked = {t.number for t in self.handle.trials() if TrialTags.of(t).superseded}
        prefix = f"{SUPERSEDED}:"
        study_marks = {int(k[len(prefix) :]) for k in self.study.user_attrs if k.startswith(prefix)}
        return marked | study_marks | set(self.study.user_attrs.get(SUPERSEDED, []))

    def supersede(self, number: int) -> None:
        # One key per trial: concurrent workers never lose each other's marks (no read-modify-write).
        self.study.set_user_attr(f"{SUPERSEDED}:{number}", True)

    def decided_points(self) -> dict[str, list[optuna.trial.FrozenTrial]]:
        """Grid points that already have an outcome that should stand."""
        decided: dict[str, list[optuna.trial.FrozenTrial]] = {}
        superseded = self.superseded()
        for frozen in self.handle.trials(states=(TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)):
            if frozen.number in superseded:
                continue
            key = TrialTags.of(frozen).grid_point or point_key(frozen.params)
            if (
                frozen.state == TrialState.FAIL
                and self.sweep.retry_failed
                and frozen.number < self.retry_below
            ):
                self.supersede(frozen.number)
                continue
            decided.setdefault(key, []).append(frozen)
        return decided

    def live_points(self) -> set[str]:
        now = wall_clock()
        return {
            TrialTags.of(t).grid_point or point_key(t.params)
            for t in self.handle.trials(states=(TrialState.RUNNING,))
            if self.claims.is_live(t, now)
        }

    def interrupted_points(self) -> list[optuna.trial.FrozenTrial]:
        """Search trials whose run was interrupted (its worker died, or it was handed back) and whose point
        has no outcome yet and nobody trains: one trial per point, the first attempt. A search retries
        these configurations before it draws new ones, as a grid plans an interrupted point again."""
        decided = self.decided_points()
        live = self.live_points()
        due: dict[str, optuna.trial.FrozenTrial] = {}
        for frozen in self.handle.trials(states=(TrialState.FAIL,)):
            tags = TrialTags.of(frozen)
            if not (tags.superseded and tags.fate and tags.fate.interrupted and frozen.params):
                continue
            key = tags.grid_point or point_key(frozen.params)
            if key not in decided and key not in live:
                due.setdefault(key, frozen)
        return list(due.values())

    def config_failure(self) -> str | None:
        """The shared reason when the first K finished trials all failed on the configuration."""
        k = self.sweep.stop_after_failures
        if k <= 0:
            return None
        superseded = self.superseded()
        finished = [t for t in self.handle.trials() if t.state.is_finished() and t.number not in superseded][
            :k
        ]
        if len(finished) < k or any(t.state != TrialState.FAIL for t in finished):
            return None
        tags = [TrialTags.of(t) for t in finished]
        # One kind of configuration error throughout: the same exception class every time.
        if all(t.fate == Fate.CONFIG_ERROR for t in tags) and len({t.error_type for t in tags}) == 1:
            return tags[0].fail_reason or ""
        return None
