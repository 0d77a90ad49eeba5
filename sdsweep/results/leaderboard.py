"""The report's leaderboard: complete trials by the objective, then the rest, the baseline as reference."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from sdsweep import metric_names
from sdsweep.config.constraints import parse_constraint
from sdsweep.errors import ConfigError
from sdsweep.metric_names import fmt, fmt_param, metric_columns, short_label
from sdsweep.results.study_folder import StudyData, best_feasible_trial, is_number
from sdsweep.results.table import is_feasible
from sdsweep.results.verdict import Verdict, interval_text
from sdsweep.study.record import TrialRecord, TrialState

_is_number = is_number


@dataclass
class Leaderboard:
    columns: list[str]
    rows: list[list[str]]
    best_trial: int | None
    row_trials: list[int | None]  # None for the baseline row
    # (row, column) -> the warnings that qualify that number (shown as ⚠ and listed under the table)
    cell_warnings: dict[tuple[int, int], list[str]] = field(default_factory=dict)
    verdict: Verdict | None = None  # how sure the study is of the best (ties, uncertain constraints)

    @property
    def warnings(self) -> dict[str, list[str]]:
        """Column label -> the distinct warnings on its numbers, for the note under the table."""
        found: dict[str, list[str]] = {}
        for (_, column), items in sorted(self.cell_warnings.items()):
            bucket = found.setdefault(self.columns[column], [])
            bucket += [w for w in items if w not in bucket]
        return found


def build_leaderboard(data: StudyData) -> Leaderboard:
    """Complete trials sorted by the objective, then pruned/failed ones; the baseline last as reference."""
    frame = data.results
    metric, direction = data.objective
    metrics = metric_columns(frame)
    metrics = [metric] + [m for m in metrics if m != metric] if metric in metrics else metrics
    base = data.baseline_metrics
    best = best_feasible_trial(frame, data.objectives)
    verdict = data.verdict()
    columns = ["#", "trial", "state"] + [short_label(p) for p in data.params]
    columns += [metric_names.label(m) for m in metrics] + ["units", "feasible", "note"]
    rows: list[list[str]] = []
    row_trials: list[int | None] = []
    cell_warnings: dict[tuple[int, int], list[str]] = {}
    if not frame.empty:
        complete = frame[
            (frame["state"] == TrialState.COMPLETE.value)
            & frame.get("objective", pd.Series(dtype=float)).notna()
        ]
        complete = complete.sort_values(["objective", "trial"], ascending=[direction == "minimize", True])
        others = frame.drop(complete.index).sort_values("trial")
        for rank, (_, row) in enumerate(pd.concat([complete, others]).iterrows(), 1):
            trial = int(row["trial"])
            cells = [
                str(rank) if trial in complete["trial"].values else "",
                f"{trial:04d}",
                str(row.get("state")),
            ]
            cells += [fmt_param(p, row.get(p)) for p in data.params]
            for m in metrics:
                qualifiers = metric_names.warnings_for(m, row.get("warnings"))
                cell = _with_delta(row.get(m), base.get(m), _interval_of(data.records.get(trial), m))
                if qualifiers and cell != "–":
                    cell_warnings[(len(rows), len(cells))] = qualifiers
                    cell += " ⚠"
                cells.append(cell)
            state = row.get("state")
            cells.append(str(verdict.units.get(trial, "–")))
            cells.append(
                ("yes" if is_feasible(row.get("feasible")) else "no")
                if state == TrialState.COMPLETE.value
                else "–"
            )
            untuned = data.baseline_for(row.get("model")) or base
            cells.append(_note(row, best, data.records.get(trial), verdict, untuned))
            rows.append(cells)
            row_trials.append(trial)
    if data.baseline:
        cells = ["", "baseline", "untuned"] + ["–" for _ in data.params]
        cells += [_with_delta(base.get(m), None, _interval_of(data.baseline, m)) for m in metrics]
        cells += ["–", "–", "step 0 (reference for deltas)"]
        rows.append(cells)
        row_trials.append(None)
    return Leaderboard(
        columns, rows, int(best["trial"]) if best else None, row_trials, cell_warnings, verdict
    )


def _interval_of(record: TrialRecord | None, metric: str) -> dict[str, Any] | None:
    return (record.intervals or {}).get(metric) if record is not None else None


def _with_delta(value: Any, baseline: Any, interval: dict[str, Any] | None = None) -> str:
    """``85.4 ± 4.1 (+15.9)``: the value, its 95% interval (half-width) and the change from the baseline."""
    if not _is_number(value):
        return "–"
    spread = interval_text(interval)
    text = f"{fmt(float(value))} {spread}" if spread else fmt(value)
    if not _is_number(baseline):
        return text
    return f"{text} ({float(value) - float(baseline):+.3g})"


def _note(
    row: pd.Series,
    best: dict[str, Any] | None,
    record: TrialRecord | None,
    verdict: Verdict | None = None,
    baseline: dict[str, Any] | None = None,
) -> str:
    trial = int(row["trial"])
    if best is not None and trial == int(best["trial"]):
        if verdict is not None and verdict.separated:
            return "best feasible trial, separated from the rest"
        return "best feasible trial"
    if verdict is not None:
        metric = verdict.objectives[0][0]
        notes = [
            "not separable from the best (" + c.describe(metric).split(": ", 1)[-1] + ")"
            for c in verdict.comparisons
            if c.trial == trial and c.tied
        ]
        if trial in verdict.uncertain:
            notes.append("feasibility uncertain: " + ", ".join(verdict.uncertain[trial]))
        if notes and row.get("state") == TrialState.COMPLETE.value and is_feasible(row.get("feasible")):
            return "; ".join(notes)
        if notes and trial in verdict.uncertain:
            failed = _failed_note(row, record, baseline)
            return "; ".join([failed] + notes[-1:]) if failed else notes[-1]
    reason = row.get("fail_reason")
    if isinstance(reason, str) and reason:
        return reason if len(reason) < 160 else reason[:157] + "..."
    if row.get("state") == TrialState.COMPLETE.value and not is_feasible(row.get("feasible")):
        return _failed_note(row, record, baseline) or "violates a constraint"
    return ""


def _failed_note(row: pd.Series, record: TrialRecord | None, baseline: dict[str, Any] | None = None) -> str:
    """What the sweep recorded the trial failing, with its values: "eval/prior_clip_score 68.56 fails >= 70"
    (read from the trial's record, which also set its "feasible", not re-judged by today's settings)."""
    notes = []
    for text in record.failed_constraints() if record is not None else []:
        try:
            c = parse_constraint(text)
        except ConfigError:  # a hand-written entry: shown as written
            notes.append(text)
            continue
        bound = c.bound(baseline)
        shown = fmt(bound) + (f" ({fmt(c.threshold)}x baseline)" if c.relative else "")
        notes.append(f"{c.metric} {fmt(row.get(c.metric))} fails {c.op} {shown}")
    return "; ".join(notes)
