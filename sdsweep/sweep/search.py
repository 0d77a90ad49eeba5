"""Claims of a search study (sweep.sampler=tpe|random|gp|cmaes): a new draw per trial, or an interrupted
configuration again.

A grid plans every point up front, so an interrupted point is simply planned again. A search draws its
points one at a time, and two things make a resumed or parallel search behave like an uninterrupted one:

- A trial whose run was interrupted (its worker died, or it was handed back) is tried again with the same
  configuration before anything new is drawn. The retry is a new trial claimed by the lowest-ticket rule
  (claims.py), with the interrupted trial's params, distributions and sampler attributes, so the sampler
  reads the retry's result as the draw it made.
- Every draw is seeded by sweep.seed and the trial's number (store.trial_seed), never once per process:
  a process started on a study that already holds trials (a re-run after a kill, a second worker) would
  otherwise replay the draws the first process made, a repeated learning rate.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from optuna.trial import FrozenTrial

from sdsweep import signals
from sdsweep.config.resolve import lr_param_names, lr_ranges
from sdsweep.config.schema import Config
from sdsweep.study.plan import LR_KEY, STEP_KEY, RunPlan, point_key, short_params, suggest
from sdsweep.study.store import StudyHandle, make_sampler, trial_seed
from sdsweep.study.trial_tags import TrialTags
from sdsweep.sweep.claimer import AGAIN, WAIT, Claim
from sdsweep.sweep.claims import Claims
from sdsweep.sweep.ledger import StudyLedger
from sdsweep.sweep.run_spec import TrialSlot

DEFAULT_SEARCH_TRIALS = 20  # sweep.n_trials unset


class SearchClaims:
    def __init__(
        self,
        cfg: Config,
        handle: StudyHandle,
        claims: Claims,
        ledger: StudyLedger,
        say: Callable[[str], None],
    ):
        self.cfg = cfg
        self.sweep = cfg.sweep
        self.handle = handle
        self.study = handle.study
        self.claims = claims
        self.ledger = ledger
        self.say = say

    def next_claim(self) -> Claim | str | None:
        """The next trial of this process: a retry or a new draw; WAIT, AGAIN, or None when done."""
        target = self.sweep.n_trials or DEFAULT_SEARCH_TRIALS
        done = sum(len(v) for v in self.ledger.decided_points().values())
        running = len(self.ledger.live_points())
        if done >= target:
            print(f"[sdsweep] search finished: {done}/{target} trials have results", flush=True)
            return None
        if done + running >= target:
            return WAIT
        count = f"{done + running + 1}/{target}"
        due = self.ledger.interrupted_points()  # the oldest first
        return self.retry(due[0], count) if due else self.draw(count)

    def finished(self) -> bool:
        done = sum(len(v) for v in self.ledger.decided_points().values())
        return done >= (self.sweep.n_trials or DEFAULT_SEARCH_TRIALS)

    def ran(self, trials: int) -> None:
        pass  # a search says each trial as it draws it (``draw``): no progress bar over a known total

    def slot(self, number: int, point: dict[str, Any]) -> TrialSlot:
        step = int(point.get(STEP_KEY, self.cfg.train.max_train_steps))
        return TrialSlot(number=number, trial_id=self.handle.trial_id(number), step=step, params=point)

    def draw(self, count: str) -> tuple[RunPlan, list[TrialSlot]]:
        with signals.critical():  # as a grid claim: made whole; a stop meanwhile is handed back by work()
            trial = self.study.ask()  # a new trial per call: nothing to race for
            # Optuna samples at the first suggest, not in ask(): reseeding now seeds this trial's draw.
            self.study.sampler = make_sampler(self.cfg, seed=trial_seed(self.sweep.seed, trial.number))
            for key, value in self.claims.identity().attrs().items():  # ours, before anything else
                trial.set_user_attr(key, value)
            point: dict[str, Any] = {}
            for key, spec in sorted(self.sweep.params.items()):
                point[key] = suggest(trial, key, spec)
            ranges = lr_ranges(self.sweep)
            # The model x method range, else the method's: a separate Optuna parameter each, so each keeps
            # its own distribution (an SDXL LoRA lr says nothing about an SD 1.5 full fine-tune's).
            name = next((n for n in lr_param_names(point) if n in ranges), None)
            if name is not None:
                point[LR_KEY] = suggest(trial, name, ranges[name])
            run = RunPlan(base=point, points=[point], shared=False)
            tags = TrialTags(grid_point=point_key(point), run_key=run.key, ticket=True)
            for key, value in tags.attrs().items():
                trial.set_user_attr(key, value)
            slot = self.slot(trial.number, point)
        self.say(f"trial {slot.number} ({count}): {short_params(point)}")
        return run, [slot]

    def point_of(self, params: dict[str, Any]) -> dict[str, Any]:
        """The point a search trial ran, from its Optuna params (the inverse of ``draw``)."""
        point = {key: params[key] for key in self.sweep.params if key in params}
        name = next((n for n in lr_param_names(point) if n in params), None)
        if name is not None:  # one name in the point and every table, whichever range drew it
            point[LR_KEY] = params[name]
        return point

    def retry(self, interrupted: FrozenTrial, count: str) -> tuple[RunPlan, list[TrialSlot]] | str:
        """The interrupted trial's configuration as a new trial (not enqueue_trial + ask, which can hand one
        queued trial to two workers on SQLite: optuna#4002)."""
        point = self.point_of(interrupted.params)
        was = TrialTags.of(interrupted)
        key = was.grid_point or point_key(point)
        run = RunPlan(base=point, points=[point], shared=False)
        run.key = was.run_key or run.key
        with signals.critical():
            tags = TrialTags(grid_point=key, run_key=run.key, ticket=True, retry_of=interrupted.number)
            number = self.claims.create_ticket(
                interrupted.params, interrupted.distributions, tags, system_attrs=interrupted.system_attrs
            )
            if not self.claims.won(number, run.key, {key}, set(self.ledger.decided_points())):
                self.claims.lose(number)
                return AGAIN
            slot = self.slot(number, point)
        self.say(
            f"trial {number} ({count}): {short_params(point)} again (trial {interrupted.number} was interrupted)"
        )
        return run, [slot]
