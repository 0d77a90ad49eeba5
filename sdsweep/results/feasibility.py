"""Which trials meet their constraints, judged on intervals: met, violated or uncertain (the interval straddles
the threshold), a relative constraint against the untuned model's value; and which infeasible trials the
constraints, rather than the objective, kept from being the pick. Used by the verdict (verdict.py) and by
``keep_best_k`` (sdsweep.sweep.recorder), so both apply one rule.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pandas as pd

from sdsweep import io
from sdsweep.config.constraints import parse_constraint
from sdsweep.study.record import TrialRecord, TrialState, read_record_or_none
from sdsweep.uncertainty import ConstraintStatus, Interval, constraint_status


def truthy(value: Any) -> bool:
    """A results cell read as a flag: a missing value (no constraint evaluated) counts as True."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return True
    if isinstance(value, str):
        return value.strip().lower() == "true"
    return bool(value)


def uncertain_constraints(
    paths: io.StudyPaths,
    results: pd.DataFrame,
    records: dict[int, TrialRecord],
    constraints: list[str],
) -> dict[int, list[str]]:
    """COMPLETE trials whose interval straddles a constraint's threshold, with those constraints."""
    out: dict[int, list[str]] = {}
    if not constraints or results.empty or "state" not in results:
        return out
    parsed = [parse_constraint(c) for c in constraints]
    for trial in results.loc[results["state"] == TrialState.COMPLETE.value, "trial"]:
        record = records.get(int(trial))
        if record is None:
            continue
        statuses = constraint_statuses(record, parsed, untuned_metrics(paths, record.model))
        straddled = [c for c, s in statuses.items() if s == ConstraintStatus.UNCERTAIN]
        if straddled:
            out[int(trial)] = straddled
    return out


def untuned_folders(paths: io.StudyPaths, model: str | None) -> list[Path]:
    """Where the untuned model's results are, in the order to look: ``baseline/<model>/`` when the sweep
    spans models, then ``baseline/``."""
    return ([paths.baseline / str(model)] if model else []) + [paths.baseline]


def untuned_metrics(paths: io.StudyPaths, model: str | None) -> dict[str, Any]:
    """The untuned model's metrics (the first of ``untuned_folders`` that has a record)."""
    for folder in untuned_folders(paths, model):
        record = read_record_or_none(folder / io.TRIAL_METRICS)
        if record is not None:
            return record.metrics
    return {}


def constraint_statuses(
    record: TrialRecord, constraints: list, baseline: dict[str, Any] | None = None
) -> dict[str, ConstraintStatus]:
    """Each constraint met, violated or uncertain for this record, judged on its metric's interval (a
    relative constraint against the untuned model's value)."""
    out = {}
    for constraint in constraints:
        interval = _interval(record, constraint.metric)
        bound = constraint.bound(baseline)
        if bound is None:
            out[str(constraint)] = ConstraintStatus.VIOLATED
            continue
        out[str(constraint)] = constraint_status(interval, constraint.op, bound)
    return out


def _interval(record: TrialRecord, metric: str) -> Interval:
    value = record.metrics.get(metric)
    number = float(value) if isinstance(value, (int, float)) else float("nan")
    raw = (record.intervals or {}).get(metric)
    # An interval is used only with the value it was computed for (a record edited by hand keeps its value).
    if raw and raw.get("value") is not None and math.isclose(float(raw["value"]), number, rel_tol=1e-9):
        return Interval.from_json(raw)
    return Interval(number, None, None, None, 0, "none", "no interval recorded")


def ruled_out(
    results: pd.DataFrame,
    best: dict[str, Any],
    objectives: list[tuple[str, str]],
    records: dict[int, TrialRecord],
) -> dict[int, list[str]]:
    """COMPLETE infeasible trials whose first objective beats the (feasible) pick's, with the constraints
    each fails: what the constraints, rather than the objective, decided."""
    metric, direction = objectives[0]
    if not truthy(best.get("feasible")) or "feasible" not in results or metric not in results:
        return {}
    value = best.get(metric)
    if not isinstance(value, (int, float)) or math.isnan(value):
        return {}
    sign = 1.0 if direction == "maximize" else -1.0
    complete = results[results["state"] == TrialState.COMPLETE.value]
    out: dict[int, list[str]] = {}
    for _, row in complete.iterrows():
        other = row.get(metric)
        if truthy(row["feasible"]) or not isinstance(other, (int, float)) or math.isnan(other):
            continue
        if sign * (float(other) - float(value)) <= 0:
            continue
        record = records.get(int(row["trial"]))
        violations = (record.violations or {}) if record is not None else {}
        out[int(row["trial"])] = sorted(c for c, v in violations.items() if float(v) > 0)
    return out
