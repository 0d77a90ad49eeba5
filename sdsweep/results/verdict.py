"""How sure the study is of its best trial: paired comparisons with the best, and constraints under uncertainty.

Every trial is evaluated on the same units (prompt x seed), so the difference between two trials is
measured unit by unit: the noise the units share (a hard prompt, an unlucky seed) cancels, and the
interval of the mean difference is far narrower than two separate intervals would suggest.

The rules, the same for the CLI's closing line, the report, W&B, export and confirmation:
- **The pick** is ``study_folder.best_trial``: the best point estimate among the trials whose point
  estimates meet every constraint (or, when none does, among all COMPLETE trials). Replicates of one
  configuration (``sweep.replicates``) are judged by the configuration's mean over its training seeds.
- **Tied:** another candidate is *not separable* from the best unless its paired difference to the best is
  told apart at a familywise 5% (``Difference.separates``): the 95% interval excludes 0 and the paired
  signed-rank test, Bonferroni-corrected over every comparison the verdict makes, rejects. "Separated from
  every other trial" is one claim about all of them, made after picking the best on the same units
  (Hsu's multiple comparisons with the best). With several objectives, a candidate is separated from the best
  only when the paired comparison shows it worse on at least one objective and better on none; an
  objective without per-unit values (FD, KD) cannot separate anyone, and the verdict says so.
- **Separated:** no candidate is tied with the best.
- **Against the untuned model:** the pick's paired difference to the baseline (the untuned model on the
  same units) on the first objective, told apart by the same rule (one comparison). When it is not, or lies
  on the wrong side, the sentence says the pick is *not separable from the untuned model*: nothing the study
  tried beat not fine-tuning under its constraints, whatever the ranking among trials says.
- **Ruled out by a constraint:** the infeasible trials whose objective beats the pick's are named with the
  constraints they fail: when the constraints, not the objective, decide the study, the sentence says so
  (e.g. a drift guard that rejects every trial that learned the concept).
- **Constraints:** each trial meets, fails or is *uncertain* on each constraint (its interval straddles the
  threshold). Uncertainty does not change the pick; it names trials whose feasibility a confirmation
  round should settle (``python -m sdsweep.confirm``). When the pick itself is uncertain, the sentence
  says so right after the pick ("but whether it meets ... is uncertain after N units").
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from sdsweep import io
from sdsweep.evaluation.units import lpips_key_of, metric_for, paired_frame, read_units
from sdsweep.results.feasibility import ruled_out, truthy, uncertain_constraints, untuned_folders
from sdsweep.study.record import TrialRecord, TrialState
from sdsweep.uncertainty import (
    Difference,
    paired_difference,
    resolvable_difference,
)

VERDICT_FILE = "verdict.json"


@dataclass
class Comparison:
    """One candidate against the best, per objective: (candidate − best) in the metric's own units."""

    trial: int
    differences: dict[str, Difference | None]  # None: the metric has no per-unit values
    tied: bool

    def describe(self, metric: str) -> str:
        difference = self.differences.get(metric)
        if difference is None:
            return f"trial {self.trial}"
        if difference.lo is None:
            return f"trial {self.trial}: Δ {metric} {difference.mean:+.3g}"
        # The signed-rank p shows why an interval that excludes 0 can still be a tie (Difference.separates).
        p_value = "" if difference.p_value is None else f", p {difference.p_value:.2g}"
        return (
            f"trial {self.trial}: Δ {metric} {difference.mean:+.3g} "
            f"[{difference.lo:+.3g}, {difference.hi:+.3g}]{p_value}"
        )


@dataclass
class Verdict:
    objectives: list[tuple[str, str]]
    best: int | None
    separated: bool | None  # None: nothing to compare (no candidate beside the best, or no per-unit values)
    comparisons: list[Comparison] = field(default_factory=list)
    uncertain: dict[int, list[str]] = field(default_factory=dict)  # trial -> constraints it straddles
    units: dict[int, int] = field(default_factory=dict)  # trial -> evaluation units behind its objective
    note: str | None = None  # why the verdict is partial (no units, a set metric)
    untuned: Difference | None = None  # the pick minus the untuned model, paired, on the first objective
    ruled_out: dict[int, list[str]] = field(default_factory=dict)  # better on the objective, but infeasible

    @property
    def beats_untuned(self) -> bool | None:
        """The pick is better than the untuned model beyond noise; None when there is no baseline to pair."""
        if self.untuned is None or self.untuned.lo is None:
            return None
        sign = 1.0 if self.objectives[0][1] == "maximize" else -1.0
        return self.untuned.separates() and sign * self.untuned.mean > 0

    @property
    def tied(self) -> list[int]:
        return [c.trial for c in self.comparisons if c.tied]

    @property
    def contenders(self) -> list[int]:
        """The trials a confirmation round re-evaluates: the best, those tied with it, and the trials whose
        feasibility is uncertain."""
        if self.best is None:
            return []
        return sorted({self.best, *self.tied, *self.uncertain})

    def sentence(self) -> str:
        """The verdict in one line, e.g. ``best trial 5; trials 4 and 7 are not separable from it (...)``."""
        if self.best is None:
            return "no best trial: no trial completed with every objective value"
        return self._among_trials() + self._pick_uncertain() + self._against_untuned() + self._ruled_out()

    def _pick_uncertain(self) -> str:
        """The pick's own feasibility, when its interval straddles a constraint: said in the headline, not
        only in the list of uncertain trials, because "separated" is then a claim about a trial that may
        break the constraint (the rule picks by point estimate; confirmation narrows the interval)."""
        constraints = self.uncertain.get(self.best) if self.best is not None else None
        if not constraints:
            return ""
        units = self.units.get(self.best)
        after = f" after {units} units" if units else ""
        return f"; but whether it meets {' and '.join(constraints)} is uncertain{after}"

    def _ruled_out(self) -> str:
        if not self.ruled_out:
            return ""
        trials = sorted(self.ruled_out)
        failed = sorted({c for t in trials for c in self.ruled_out[t]})
        names = _join([str(t) for t in trials])
        verb = "scores" if len(trials) == 1 else "score"
        return (
            f"; trial{'s' if len(trials) > 1 else ''} {names} {verb} higher on {self.objectives[0][0]} but "
            f"fail{'s' if len(trials) == 1 else ''} {'; '.join(failed)}"
        )

    def _against_untuned(self) -> str:
        if self.untuned is None or self.untuned.lo is None:
            return ""
        metric = self.objectives[0][0]
        delta = f"Δ {metric} {self.untuned.mean:+.3g} [{self.untuned.lo:+.3g}, {self.untuned.hi:+.3g}]"
        if self.beats_untuned:
            return f"; over the untuned model: {delta}"
        return (
            f"; NOT separable from the untuned model ({delta}): nothing this study tried beats not "
            "fine-tuning under its constraints"
        )

    def _among_trials(self) -> str:
        metric = self.objectives[0][0]
        head = f"best trial {self.best}"
        if self.separated is None:
            return f"{head}; {self.note or 'nothing to compare it with'}"
        if self.separated:
            closest = self._closest()
            tail = f" (closest: {closest.describe(metric)})" if closest is not None else ""
            return f"{head}, separated from every other candidate{tail}"
        tied = [c for c in self.comparisons if c.tied]
        names = _join([str(c.trial) for c in tied])
        details = "; ".join(c.describe(metric).split(": ", 1)[-1] for c in tied[:3])
        verb = "is" if len(tied) == 1 else "are"
        return f"{head}; trial{'s' if len(tied) > 1 else ''} {names} {verb} not separable from it ({details})"

    def uncertain_sentence(self) -> str | None:
        if not self.uncertain:
            return None
        parts = [f"trial {t} ({', '.join(c)})" for t, c in sorted(self.uncertain.items())]
        return "feasibility uncertain (interval straddles the threshold): " + "; ".join(parts)

    def _closest(self) -> Comparison | None:
        metric = self.objectives[0][0]
        known = [c for c in self.comparisons if c.differences.get(metric) is not None]
        return max(known, key=lambda c: self._oriented(c, metric), default=None)

    def _oriented(self, comparison: Comparison, metric: str) -> float:
        direction = dict(self.objectives)[metric]
        difference = comparison.differences[metric]
        assert difference is not None
        return difference.mean if direction == "maximize" else -difference.mean

    def to_json(self) -> dict[str, Any]:
        return {
            "objectives": [{"metric": m, "direction": d} for m, d in self.objectives],
            "best": self.best,
            "separated": self.separated,
            "tied": self.tied,
            "contenders": self.contenders,
            "uncertain": {str(k): v for k, v in self.uncertain.items()},
            "units": {str(k): v for k, v in self.units.items()},
            "comparisons": [
                {
                    "trial": c.trial,
                    "tied": c.tied,
                    "differences": {m: d.to_json() if d else None for m, d in c.differences.items()},
                }
                for c in self.comparisons
            ],
            "sentence": self.sentence(),
            "uncertain_sentence": self.uncertain_sentence(),
            "note": self.note,
            "untuned": self.untuned.to_json() if self.untuned is not None else None,
            "beats_untuned": self.beats_untuned,
            "ruled_out": {str(k): v for k, v in self.ruled_out.items()},
        }


def _join(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


# ---- computing it -----------------------------------------------------------------------------------------
def judge_study(
    root: str | os.PathLike,
    results: pd.DataFrame,
    objectives: list[tuple[str, str]],
    best: dict[str, Any] | None,
    records: dict[int, TrialRecord] | None = None,
    constraints: list[str] | None = None,
) -> Verdict:
    """The verdict on ``best`` (a results row from ``best_trial``) against the other candidates."""
    paths = io.StudyPaths(Path(root))
    verdict = Verdict(objectives=list(objectives), best=None, separated=None)
    if best is None or best.get("trial") is None:
        return verdict
    verdict.best = int(best["trial"])
    verdict.uncertain = uncertain_constraints(paths, results, records or {}, constraints or [])
    verdict.ruled_out = ruled_out(results, best, objectives, records or {})
    pool = [t for t in _candidates(results, best) if t not in (best.get("replicate_trials") or [])]
    units = {n: _units(paths, n) for n in [verdict.best, *pool]}
    best_units = units[verdict.best]
    if best_units is None:
        verdict.note = "it was evaluated before per-unit results existed: no paired comparison"
        return verdict
    per_unit = {m for m, _ in objectives if metric_for(m, best_units, lpips_key_of(best_units)) is not None}
    untuned_units = _untuned_units(paths, (records or {}).get(verdict.best))
    if objectives[0][0] in per_unit and untuned_units is not None:
        verdict.untuned = paired_on(objectives[0][0], best_units, untuned_units)
    verdict.units = {
        n: int(len(_values(u, objectives[0][0]))) for n, u in units.items() if u is not None and per_unit
    }
    if not per_unit:
        verdict.note = (
            f"{_join([m for m, _ in objectives])} has no per-unit values (a set statistic): "
            "ties cannot be judged; add a per-image objective (eval/clip_score) to compare paired"
        )
        return verdict
    compared = [trial for trial in pool if units[trial] is not None]
    family = len(compared) * len(per_unit)  # every paired comparison the separation claim rests on
    for trial in compared:
        comparison = _compare(trial, units[trial], best_units, objectives, per_unit, family)
        verdict.comparisons.append(comparison)
    if not verdict.comparisons:
        verdict.note = "no other candidate to compare it with"
        return verdict
    verdict.separated = not any(c.tied for c in verdict.comparisons)
    missing = [m for m, _ in objectives if m not in per_unit]
    if missing:
        verdict.note = f"judged on {_join(sorted(per_unit))} alone: {_join(missing)} has no per-unit values"
    return verdict


def _candidates(results: pd.DataFrame, best: dict[str, Any]) -> list[int]:
    """The other trials the pick was made among: COMPLETE, and feasible when the best is."""
    if results.empty or "state" not in results:
        return []
    pool = results[(results["state"] == TrialState.COMPLETE.value) & (results["trial"] != best["trial"])]
    if "feasible" in pool and truthy(best.get("feasible")) and not pool.empty:
        pool = pool[pool["feasible"].map(truthy).astype(bool)]  # an empty object mask would select columns
    return sorted(int(t) for t in pool["trial"])


def _untuned_units(paths: io.StudyPaths, record: TrialRecord | None) -> pd.DataFrame | None:
    """The baseline's unit table for the pick's model (``baseline/<model>/`` when the sweep spans models)."""
    for folder in untuned_folders(paths, record.model if record is not None else None):
        try:
            table = read_units(folder)
        except io.DamagedFileError:
            continue
        if table is not None:
            return table
    return None


def _units(paths: io.StudyPaths, trial: int) -> pd.DataFrame | None:
    try:
        return read_units(paths.trial(trial))
    except io.DamagedFileError:
        return None


def _values(units: pd.DataFrame, metric: str) -> pd.DataFrame:
    definition = metric_for(metric, units, lpips_key_of(units))
    return definition.values(units) if definition is not None else units.iloc[0:0]


def _compare(
    trial: int,
    units: pd.DataFrame,
    best_units: pd.DataFrame,
    objectives: list[tuple[str, str]],
    per_unit: set[str],
    family: int,
) -> Comparison:
    differences: dict[str, Difference | None] = {}
    worse = better = False
    for metric, direction in objectives:
        difference = paired_on(metric, units, best_units) if metric in per_unit else None
        differences[metric] = difference
        if difference is not None and difference.separates(family):
            sign = 1.0 if direction == "maximize" else -1.0
            if sign * difference.mean < 0:
                worse = True
            else:
                better = True
    return Comparison(trial, differences, tied=not (worse and not better))


def paired_on(metric: str, units: pd.DataFrame, reference: pd.DataFrame) -> Difference | None:
    """``units`` minus ``reference`` on ``metric``, paired over the units both tables hold (stratified by
    prompt); None when the metric has no per-unit values or fewer than 2 units are shared."""
    definition = metric_for(metric, reference, lpips_key_of(reference))
    if definition is None:
        return None
    pairs = paired_frame(definition.values(units), definition.values(reference))
    if len(pairs) < 2:
        return None
    return paired_difference(
        pairs["value_a"].to_numpy(), pairs["value_b"].to_numpy(), strata=pairs["prompt_index"].to_numpy()
    )


def noise_statement(units: pd.DataFrame | None, metric: str, direction: str = "maximize") -> str | None:
    """What one trial's evaluation can resolve, from the baseline's unit-to-unit spread, e.g. "with 16 units,
    eval/clip_score SE ≈ 4.8: differences under ~13 are not resolvable; ..."."""
    if units is None:
        return None
    definition = metric_for(metric, units, lpips_key_of(units))
    if definition is None:
        return f"{metric} is one statistic of the whole image set: its noise cannot be estimated per unit"
    interval = definition.interval(units)
    if interval.se is None or not math.isfinite(interval.se):
        return None
    smallest = resolvable_difference(interval.se)
    return (
        f"with {interval.n} units, {metric} SE ≈ {interval.se:.2g} (from the baseline's spread): differences "
        f"under ~{smallest:.2g} are not resolvable; raise eval.num_images_per_prompt or confirm the "
        "contenders (python -m sdsweep.confirm)"
    )


def write_verdict(root: str | os.PathLike, verdict: Verdict) -> Path:
    return io.atomic_write_json(io.StudyPaths(Path(root)).root / VERDICT_FILE, verdict.to_json())


def read_verdict(root: str | os.PathLike) -> dict[str, Any] | None:
    try:
        return io.read_json(io.StudyPaths(Path(root)).root / VERDICT_FILE)
    except io.DamagedFileError:
        return None


def interval_text(interval: dict[str, Any] | None) -> str:
    """``± 4.8`` for a table cell: the interval's half-width to 2 significant digits, or ``[0.51, 1]`` when
    the interval is lopsided (a rate near 0 or 1)."""
    if not interval or interval.get("lo") is None or interval.get("hi") is None:
        return ""
    lo, hi, value = float(interval["lo"]), float(interval["hi"]), float(interval["value"])
    below, above = value - lo, hi - value
    if abs(below - above) <= 0.25 * max(below, above, 1e-12):
        return f"± {(below + above) / 2:.2g}"
    return f"[{lo:.2g}, {hi:.2g}]"
