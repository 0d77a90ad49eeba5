"""Recording a trial's outcome: its folder first, then Optuna, then tracking; and keep_best_k afterwards.

Files are written before Optuna is told, so a trial the study calls COMPLETE always has its files; a
process killed in between leaves a folder whose trial is not a result (``enforce_keep_best_k`` knows).
"""

from __future__ import annotations

import dataclasses
import math
import shutil
from pathlib import Path

import optuna

from sdsweep import faults, io
from sdsweep.config.constraints import parse_constraint
from sdsweep.config.load import to_yaml
from sdsweep.config.schema import Config
from sdsweep.study.record import TrialRecord, TrialState, read_record, read_record_or_none
from sdsweep.study.store import StudyHandle, TrialLink, objective_values
from sdsweep.study.trial_tags import INTERVALS, VIOLATIONS, Fate, TrialTags
from sdsweep.sweep.run_spec import RunSpec, TrialSlot

# Errors from telling a trial that someone else already finished (it was taken over as stale).
TAKEN_OVER = (optuna.exceptions.UpdateFinishedTrialError, RuntimeError, ValueError)


class TrialRecorder:
    """Writes a trial's folder and tells Optuna and tracking, in that order, so files exist first."""

    def __init__(
        self,
        cfg: Config,
        spec: RunSpec,
        paths: io.StudyPaths,
        baseline: dict[str, float],
        baseline_dir: Path | None = None,
        handle: StudyHandle | None = None,
    ):
        from sdsweep.sweep import tracking

        self.cfg = cfg
        self.spec = spec
        self.paths = paths
        self.baseline = baseline
        self.baseline_dir = baseline_dir  # its units.csv pairs each delta with an interval
        self.constraints = [parse_constraint(c) for c in cfg.sweep.constraints]
        # The claiming engine's handle when it runs in this process; a run on its own opens one.
        self.handle = handle or StudyHandle(cfg, spec.storage, spec.study)
        self.study = self.handle.study
        self.live = tracking.LiveTrialRuns(cfg, spec.study, spec.slots, paths.wandb)  # W&B while training

    def link(self, slot: TrialSlot) -> TrialLink:
        link = TrialLink(self.handle, slot.number)
        # The trial's folder relative to the study folder: the storage outlives a move of the folder (or sees
        # it mounted elsewhere).
        trial_dir = self.paths.trial(slot.number).relative_to(self.paths.root).as_posix()
        link.set_tags(TrialTags(run_key=self.spec.run_key, trial_dir=trial_dir))
        return link

    def tell(self, slot: TrialSlot, action) -> None:
        """Tell Optuna; a trial finished by someone else meanwhile (taken over as stale) is left alone."""
        try:
            action()
        except TAKEN_OVER as error:
            print(
                f"[sdsweep] trial {slot.number} was taken over by another worker ({error}); its result is kept on disk only",
                flush=True,
            )

    def base_record(self, slot: TrialSlot) -> TrialRecord:
        return TrialRecord(
            trial=slot.number,
            params=slot.params,
            step=slot.step,
            model=self.cfg.model.name,
            pretrained=self.cfg.model.path or self.cfg.model.pretrained,
            method=self.cfg.method.name,
            learning_rate=self.cfg.method.learning_rate,
            max_train_steps=slot.step,
            run_key=self.spec.run_key,
        )

    def write_config(self, slot: TrialSlot) -> None:
        trial_dir = self.paths.trial(slot.number)
        trial_dir.mkdir(parents=True, exist_ok=True)
        # The saved config reproduces this grid point exactly (a shared run trains further).
        own = dataclasses.replace(
            self.cfg, train=dataclasses.replace(self.cfg.train, max_train_steps=slot.step)
        )
        io.atomic_write_text(trial_dir / io.TRIAL_CONFIG, to_yaml(own))

    def complete(self, slot: TrialSlot, record: TrialRecord, link: TrialLink) -> None:
        metrics = record.metrics
        record.delta = {
            f"delta/{k}": metrics[k] - v
            for k, v in self.baseline.items()
            if k in metrics and isinstance(v, (int, float)) and metrics[k] is not None
        }
        record.intervals = {**(record.intervals or {}), **self.delta_intervals(slot, record)}
        violations = [c.violation(metrics, self.baseline) for c in self.constraints]
        record.violations = {str(c): v for c, v in zip(self.constraints, violations)}
        record.feasible = all(v <= 0 for v in violations)
        values = objective_values(self.cfg, metrics)
        if isinstance(values, str):
            reason = f"{values}: {record.missing.get(self.cfg.sweep.objectives[0].metric.split('/', 1)[-1], '')}".rstrip(
                ": "
            )
            self.fail(slot, record, link, reason, fate=Fate.NO_OBJECTIVE)
            return
        record.state = TrialState.COMPLETE
        record.objective = values[0]
        record.write(self.paths.trial(slot.number) / io.TRIAL_METRICS)
        faults.kill_at("after_record")  # tests: a crash between the record and telling Optuna
        for name, value in metrics.items():  # every metric readable per trial in the dashboard
            if isinstance(value, (int, float)) and math.isfinite(value):
                self.tell(slot, lambda n=name, v=value: link.set_attr(n, float(v)))
        # Headline intervals in one attribute ({metric: [lo, hi]}): one storage write, not three per metric.
        intervals = {
            k: [i["lo"], i["hi"]]
            for k, i in (record.intervals or {}).items()
            if i.get("lo") is not None and k.count("/") == 1
        }
        if intervals:
            self.tell(slot, lambda: link.set_attr(INTERVALS, intervals))
        self.tell(
            slot, lambda: self.upload_grids(slot, link)
        )  # before complete: a finished trial is read-only
        self.tell(slot, lambda: link.complete(values, record.violations))

    def delta_intervals(self, slot: TrialSlot, record: TrialRecord) -> dict[str, dict]:
        """``delta/<metric>``'s interval: the trial minus the untuned model, paired over the units both were
        evaluated on (the same prompts and seeds), for every per-image metric."""
        from sdsweep.evaluation.units import read_units_or_none
        from sdsweep.results.verdict import paired_on
        from sdsweep.uncertainty import Interval

        base = read_units_or_none(self.baseline_dir) if self.baseline_dir else None
        mine = read_units_or_none(self.paths.trial(slot.number)) if base is not None else None
        out = {}
        for key in record.delta if mine is not None else ():
            difference = paired_on(key.removeprefix("delta/"), mine, base)
            if difference is not None and difference.lo is not None:
                d = difference
                out[key] = Interval(d.mean, d.lo, d.hi, d.se, d.n, "paired bootstrap").to_json()
        return out

    def upload_grids(self, slot: TrialSlot, link: TrialLink) -> None:
        """The trial's grid on its dashboard page, the baseline's on the study's (once each)."""
        from sdsweep.study import artifacts

        store = artifacts.artifact_dir(self.paths.root, self.cfg.sweep.artifact_dir)
        storage = self.handle.storage
        try:
            artifacts.upload_once(store, self.paths.trial(slot.number) / io.TRIAL_GRID, link.trial, storage)
            baseline = self.paths.baseline / io.TRIAL_GRID
            artifacts.upload_once(store, baseline, self.study, storage, artifacts.BASELINE_GRID)
        except OSError as error:  # the images are a view: an unwritable store must not fail the trial
            print(
                f"[sdsweep] trial {slot.number}: grid not uploaded to the artifact store {store} ({error})",
                flush=True,
            )

    def fail(
        self,
        slot: TrialSlot,
        record: TrialRecord,
        link: TrialLink,
        reason: str,
        state: TrialState = TrialState.FAIL,
        fate: Fate = Fate.ERROR,
        error_type: str | None = None,
    ) -> None:
        record.state = state
        record.fail_reason = reason
        record.write(self.paths.trial(slot.number) / io.TRIAL_METRICS)
        if state == TrialState.PRUNED:
            self.tell(slot, lambda: link.prune(reason))
        else:
            self.tell(slot, lambda: link.fail(reason, fate, error_type))

    def track(self, slot: TrialSlot, record: TrialRecord, images: dict) -> None:
        from sdsweep.sweep import tracking

        run_id = self.live.finish(slot.number, record) or tracking.record_trial(
            self.cfg, self.spec.study, slot.number, slot.params, record, images, self.paths.wandb
        )
        if run_id:
            record.wandb_run_id = run_id
            record.write(self.paths.trial(slot.number) / io.TRIAL_METRICS)
            self.handle.set_tags(
                slot.number, TrialTags(wandb_run_id=run_id)
            )  # False once finished: kept on disk


def enforce_keep_best_k(cfg: Config, paths: io.StudyPaths, handle: StudyHandle) -> None:
    """Keep weights only for the best k COMPLETE trials in the storage (feasible first).

    The ranking comes from the study, not from trial folders: a folder whose metrics.json says
    COMPLETE but whose trial was never told (killed in between) is not a result and is never ranked.
    Safe with concurrent workers: a trial outside the top k of some snapshot of the study stays
    outside it when more trials finish, and the best trial so far is always inside it. With several
    objectives "best" is a Pareto-front member (sdsweep.results.table.best_trial), so the whole front
    keeps its weights even beyond k: a dominated trial stays dominated, so nothing deleted can become
    the best later. The trials verdict.json names as contenders keep theirs too (confirmation races
    them), and so do the trials not separable from the best so far (Difference.separates), which
    confirmation would race. A feasible trial whose interval straddles a constraint does not count towards
    k (``feasible_until_k_sure``). The record says so before any file is deleted.
    """
    k = cfg.sweep.keep_best_k
    if k < 0:
        return
    signs = [1.0 if o.direction == "maximize" else -1.0 for o in cfg.sweep.objectives]
    ranked: list[tuple[bool, float, int]] = []
    scores: dict[int, tuple[bool, list[float]]] = {}
    unranked = []
    for frozen in handle.trials():
        if frozen.state.is_finished():
            _remove_staging(paths.trial(frozen.number))  # left by a save that was killed
        if frozen.state.is_finished() and frozen.state != optuna.trial.TrialState.COMPLETE:
            unranked.append(frozen.number)  # e.g. killed after its save and retried: not a result
        if frozen.state != optuna.trial.TrialState.COMPLETE or not frozen.values:
            continue
        values = [s * v if math.isfinite(v) else -math.inf for s, v in zip(signs, frozen.values)]
        violations = frozen.user_attrs.get(VIOLATIONS) or {}
        feasible = all(float(v) <= 0 for v in violations.values())
        ranked.append((not feasible, -values[0], frozen.number))
        scores[frozen.number] = (feasible, values)
    ranked.sort()
    keep = {number for _, _, number in ranked[:k]} | confirmation_contenders(paths)
    feasible = [number for infeasible, _, number in ranked if not infeasible]
    keep |= feasible_until_k_sure(paths, feasible, k, cfg.sweep.constraints)
    # Only a trial that still has weights can lose them: the paired bootstraps below run for those alone,
    # so a long study does not re-bootstrap every trial already pruned of its weights after each run.
    holding = {n for _, _, n in ranked if n not in keep and _has_weights(paths.trial(n))}
    if ranked:  # a trial not separable from the best so far may be the best after confirmation: keep it
        best_infeasible, _, best = ranked[0]
        rest = [n for infeasible, _, n in ranked if n in holding and infeasible == best_infeasible]
        keep |= tied_with(paths, best, rest, cfg.sweep.objectives[0].metric)
        # An infeasible trial that beats the best but only straddles a threshold may turn out feasible.
        better = [
            n
            for infeasible, value, n in ranked
            if infeasible and value < ranked[0][1] and n in holding - keep
        ]
        keep |= possibly_feasible(paths, better, cfg.sweep.constraints)
    if len(signs) > 1:
        keep |= pareto_members(scores)
    losers = [(n, f"not among the best {k} (sweep.keep_best_k)") for _, _, n in ranked if n not in keep]
    losers += [(number, "this attempt has no result in the study (sweep.keep_best_k)") for number in unranked]
    for number, why in losers:
        _remove_weights(paths.trial(number), why)


def _remove_weights(trial_dir: Path, why: str) -> None:
    """The record says why first, then the weights go: a kill in between leaves a record without weights."""
    record = read_record(trial_dir / io.TRIAL_METRICS)
    if not record or not record.weights:
        return
    record.weights = None
    record.weights_removed = why
    record.write(trial_dir / io.TRIAL_METRICS)
    shutil.rmtree(trial_dir / io.TRIAL_WEIGHTS, ignore_errors=True)


def _has_weights(trial_dir: Path) -> bool:
    record = read_record(trial_dir / io.TRIAL_METRICS)
    return bool(record and record.weights)


def tied_with(paths: io.StudyPaths, best: int, others: list[int], metric: str) -> set[int]:
    """The trials among ``others`` that ``best`` is not told apart from on ``metric`` (the verdict's rule,
    ``Difference.separates`` over ``len(others)`` comparisons), judged on the units both were evaluated on."""
    from sdsweep.evaluation.units import read_units_or_none
    from sdsweep.results.verdict import paired_on

    best_units = read_units_or_none(paths.trial(best))
    if best_units is None:
        return set()
    tied = set()
    for number in others:
        units = read_units_or_none(paths.trial(number))
        difference = paired_on(metric, units, best_units) if units is not None else None
        if difference is not None and not difference.separates(len(others)):
            tied.add(number)
    return tied


def possibly_feasible(paths: io.StudyPaths, trials: list[int], constraints: list[str]) -> set[int]:
    """The trials among ``trials`` that no constraint surely rejects (each is met or uncertain on its interval)."""
    from sdsweep.uncertainty import ConstraintStatus

    return {
        number
        for number, statuses in _constraint_statuses(paths, trials, constraints).items()
        if all(s != ConstraintStatus.VIOLATED for s in statuses)
    }


def straddling(paths: io.StudyPaths, trials: list[int], constraints: list[str]) -> set[int]:
    """The trials among ``trials`` whose interval straddles some constraint's threshold."""
    from sdsweep.uncertainty import ConstraintStatus

    return {
        number
        for number, statuses in _constraint_statuses(paths, trials, constraints).items()
        if ConstraintStatus.UNCERTAIN in statuses
    }


def _constraint_statuses(paths: io.StudyPaths, trials: list[int], constraints: list[str]) -> dict[int, list]:
    """Each trial's status on each constraint, judged on its interval; trials without a record are left out."""
    from sdsweep.results.feasibility import constraint_statuses, untuned_metrics

    parsed = [parse_constraint(c) for c in constraints]
    found = {}
    for number in trials:
        record = read_record_or_none(paths.trial(number) / io.TRIAL_METRICS)
        if record is None or not parsed:
            continue
        found[number] = list(
            constraint_statuses(record, parsed, untuned_metrics(paths, record.model)).values()
        )
    return found


def feasible_until_k_sure(
    paths: io.StudyPaths, feasible: list[int], k: int, constraints: list[str]
) -> set[int]:
    """The best feasible trials (``feasible`` in rank order) down to the k-th that no interval leaves in
    doubt, with at most k in doubt on top (a bound on the disk). A feasible trial whose interval straddles a
    threshold may turn infeasible when confirmation evaluates it again, and then the next feasible trial is
    the pick: its weights must still be there (a fresh shapes build lost its pick that way: the three kept
    trials all turned infeasible, and the new pick had been deleted)."""
    doubtful = straddling(paths, feasible, constraints)
    kept: set[int] = set()
    for number in feasible:
        if len(kept - doubtful) >= k or (number in doubtful and len(kept & doubtful) >= k):
            continue
        kept.add(number)
    return kept


def confirmation_contenders(paths: io.StudyPaths) -> set[int]:
    """The trials verdict.json names as contenders: confirmation re-evaluates them from their weights, so
    keep_best_k keeps them (a missing or damaged verdict protects nothing extra)."""
    from sdsweep.results.verdict import VERDICT_FILE

    raw = io.read_json_or_none(paths.root / VERDICT_FILE)
    found = raw.get("contenders") if isinstance(raw, dict) else None
    if not isinstance(found, list):
        return set()
    return {int(t) for t in found if isinstance(t, (int, float)) and not isinstance(t, bool)}


def pareto_members(scores: dict[int, tuple[bool, list[float]]]) -> set[int]:
    """Trials on the Pareto front of the pool best_trial chooses from: the feasible trials when any
    is feasible, else all. ``scores`` holds (feasible, values oriented so that higher is better)."""
    pool = {n: v for n, (feasible, v) in scores.items() if feasible} or {n: v for n, (_, v) in scores.items()}

    def dominated(values: list[float]) -> bool:
        return any(
            all(o >= v for o, v in zip(other, values)) and any(o > v for o, v in zip(other, values))
            for other in pool.values()
        )

    return {number for number, values in pool.items() if not dominated(values)}


def _remove_staging(trial_dir: Path) -> None:
    for leftover in trial_dir.glob(f".{io.TRIAL_WEIGHTS}.*.staging"):
        shutil.rmtree(leftover, ignore_errors=True)
