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
from sdsweep.study.store import CLAIM_LOST, FAIL_REASON, GRID_POINT, SUPERSEDED, StudyHandle
from sdsweep.sweep.claims import CRASHED, HANDED_BACK, Claims, wall_clock

# Exceptions that say the configuration is wrong, not the trial: K of them in a row stop the sweep.
CONFIG_ERRORS = ("ConfigError", "ModelUnavailableError", "DataError", "UserError")


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
        marked = {t.number for t in self.handle.trials() if t.user_attrs.get(SUPERSEDED)}
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
            key = frozen.user_attrs.get(GRID_POINT) or point_key(frozen.params)
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
            t.user_attrs.get(GRID_POINT) or point_key(t.params)
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
            attrs = frozen.user_attrs
            if not attrs.get(SUPERSEDED) or attrs.get(CLAIM_LOST) or not frozen.params:
                continue
            if not (attrs.get(CRASHED) or attrs.get(HANDED_BACK)):
                continue
            key = attrs.get(GRID_POINT) or point_key(frozen.params)
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
        kinds = {str(t.user_attrs.get(FAIL_REASON, "")).split(":", 1)[0] for t in finished}
        if len(kinds) == 1 and kinds & set(CONFIG_ERRORS):
            return str(finished[0].user_attrs.get(FAIL_REASON))
        return None
