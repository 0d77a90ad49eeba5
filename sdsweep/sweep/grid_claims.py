"""Claims of a grid study (sweep.sampler=grid): plan the grid again from the storage, then claim the first
training run nobody holds (``claims.Claims``: a ticket per run, the lowest ticket wins).

A single run (no +sweep: ``sweep.single_run``) is a grid of one empty point, identified by its whole config.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from typing import Any

from optuna.distributions import CategoricalDistribution

from sdsweep import signals
from sdsweep.config.load import to_yaml
from sdsweep.config.resolve import flatten
from sdsweep.config.schema import Config
from sdsweep.progress import Progress
from sdsweep.study.plan import RunPlan, canonical, command_line_values, point_key
from sdsweep.study.planner import grid_finished, plan_grid, steps_of
from sdsweep.study.store import StudyHandle
from sdsweep.study.trial_tags import TrialTags
from sdsweep.sweep.claimer import AGAIN, WAIT, Claim
from sdsweep.sweep.claims import Claims
from sdsweep.sweep.fingerprint import is_location_only
from sdsweep.sweep.ledger import StudyLedger
from sdsweep.sweep.run_spec import TrialSlot


def single_run_key(cfg: Config, known: set[str]) -> str:
    """A single run's identity: its whole config except where things are (the study's fingerprint checks
    what the data and model folders hold). A study started by an older sdsweep keeps the key it gave its
    run (that one hashed the paths too), so the run is not trained again."""
    # sweep.single_run is left out of both hashes: it came later, and studies keep the keys they gave.
    kept = {k: v for k, v in flatten(cfg).items() if not is_location_only(k) and k != "sweep.single_run"}
    key = "single:" + hashlib.sha1(json.dumps(kept, sort_keys=True, default=str).encode()).hexdigest()[:12]
    before_flag = to_yaml(cfg).replace("\n  single_run: true\n", "\n")
    legacy = "single:" + hashlib.sha1(before_flag.encode()).hexdigest()[:12]
    return legacy if legacy in known and key not in known else key


class GridClaims:
    def __init__(
        self,
        cfg: Config,
        overrides: list[str],
        handle: StudyHandle,
        claims: Claims,
        ledger: StudyLedger,
        say: Callable[[str], None],
        label: str,
    ):
        self.cfg, self.sweep = cfg, cfg.sweep
        self.handle, self.claims, self.ledger = handle, claims, ledger
        self.say, self.label = say, label
        self.announced = False
        self.overall: Progress | None = None  # points done of those this process found pending
        # A single run is identified by its whole config, so changing any value runs again.
        self.single_key: str | None = None
        self.single_params: dict[str, Any] = {}
        if self.sweep.single_run:
            known = set(ledger.decided_points()) | ledger.live_points()
            self.single_key = single_run_key(cfg, known)
            # What the user set on the command line (e.g. each job of a Hydra -m multirun) is what tells
            # single runs apart: it becomes the trial's parameters in results and the report.
            self.single_params = command_line_values(overrides)

    def key_of(self, point: dict[str, Any]) -> str:
        return self.single_key if self.single_key and not point else point_key(point)

    def next_claim(self) -> Claim | str | None:
        plan = plan_grid(self.cfg, self.key_of, self.ledger.decided_points(), self.ledger.live_points())
        study = f"study '{self.cfg.study}': {plan.points} grid points, {plan.decided} already done"
        if not plan.pending:
            if plan.live:
                if not self.announced:
                    self.announced = True
                    self.say(
                        f"{study}, {plan.live} running elsewhere, none left to claim; waiting while they run, "
                        "to take over any whose heartbeat stops"
                    )
                return WAIT  # the rest is being trained elsewhere; wait in case its worker dies
            if not self.announced:
                print(
                    f"[sdsweep] grid finished: all {plan.points} grid points have results; nothing to run",
                    flush=True,
                )
            return None
        if not self.announced:
            self.announced = True
            self.overall = Progress(
                f"sweep {self.cfg.study} ({self.label})", len(plan.pending), "points", lines_only=True
            )
            self.say(
                f"{study}, {plan.live} running elsewhere, {len(plan.pending)} to run in {len(plan.runs)} "
                "training run(s)"
            )
        for run in plan.runs:
            slots = self.claim(run)
            if slots:
                return run, slots
        return AGAIN  # every run was claimed by someone else meanwhile: plan again

    def claim(self, run: RunPlan) -> list[TrialSlot] | None:
        """The run's trials, created RUNNING as ours; None when another process holds the run.

        A claim is made whole, uninterrupted: a Ctrl-C that arrives meanwhile is raised once the trials
        exist, and the engine's work loop hands them back, so none is left RUNNING to be taken over later
        as crashed.
        """
        with signals.critical():
            keys = {self.key_of(p) for p in run.points}
            first = self.new_trial(run.points[0], run, ticket=True)
            if not self.claims.won(first.number, run.key, keys, set(self.ledger.decided_points())):
                self.claims.lose(first.number)
                return None
            return [first] + [self.new_trial(p, run, ticket=False) for p in run.points[1:]]

    def params_of(self, point: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        params, distributions = {}, {}
        for key, spec in self.sweep.params.items():
            if key in point:
                value = canonical(point[key])
                choices = [canonical(c) for c in spec.choices] if spec.choices else [value]
                params[key], distributions[key] = value, CategoricalDistribution(choices)
        return params, distributions

    def new_trial(self, point: dict[str, Any], run: RunPlan, ticket: bool) -> TrialSlot:
        params, distributions = self.params_of(point)
        tags = TrialTags(grid_point=self.key_of(point), run_key=run.key, ticket=ticket)
        number = self.claims.create_ticket(params, distributions, tags)
        shown = point or self.single_params  # a single run plans no point; record what set it apart
        trial_id = self.handle.trial_id(number)
        return TrialSlot(number=number, trial_id=trial_id, step=steps_of(point, self.cfg), params=shown)

    def finished(self) -> bool:
        return grid_finished(self.cfg, self.key_of, self.ledger.decided_points())

    def ran(self, trials: int) -> None:
        if self.overall is not None:
            self.overall.advance(trials)
