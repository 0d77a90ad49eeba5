"""The study's result table: one row per trial, every parameter and metric, written atomically."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pandas as pd

from sdsweep import io

LEADING_COLUMNS = ["trial", "state", "model", "method", "learning_rate", "max_train_steps"]


def trial_rows(
    paths: io.StudyPaths, optuna_trials: list[Any] | None = None, superseded: set[int] | None = None
) -> list[dict[str, Any]]:
    """Rows from each trial's metrics.json; Optuna's view fills in trials that never wrote one."""
    from sdsweep.study_store import FAIL_REASON

    rows: dict[int, dict[str, Any]] = {}
    for trial_dir in paths.trial_dirs():
        record = io.read_json(trial_dir / io.TRIAL_METRICS)
        if not record:
            continue
        row = _row_from_record(record, trial_dir)
        rows[row["trial"]] = row
    superseded = set(superseded or ())
    for frozen in optuna_trials or []:
        if frozen.number in superseded:
            continue
        row = rows.setdefault(
            frozen.number, {"trial": frozen.number, "trial_dir": str(paths.trial(frozen.number))}
        )
        row["state"] = frozen.state.name  # the storage is the source of truth for the state
        for key, value in frozen.params.items():
            row.setdefault(key, value)
        if frozen.user_attrs.get(FAIL_REASON) and not row.get("fail_reason"):
            row["fail_reason"] = frozen.user_attrs[FAIL_REASON]
    return [rows[k] for k in sorted(rows) if k not in superseded]


def _row_from_record(record: dict[str, Any], trial_dir: Path) -> dict[str, Any]:
    row: dict[str, Any] = {k: record.get(k) for k in LEADING_COLUMNS}
    row.update(record.get("params") or {})
    row.update({k: v for k, v in (record.get("metrics") or {}).items()})
    row.update(record.get("delta") or {})
    row["feasible"] = record.get("feasible")
    row["objective"] = record.get("objective")
    row["fail_reason"] = record.get("fail_reason")
    row["missing"] = "; ".join(f"{k}: {v}" for k, v in (record.get("missing") or {}).items()) or None
    row["warnings"] = "; ".join(record.get("warnings") or []) or None
    row["train_seconds"] = record.get("train_seconds")
    row["eval_seconds"] = record.get("eval_seconds")
    row["trial_dir"] = str(trial_dir)
    weights = record.get("weights")
    row["weights_dir"] = str(trial_dir / weights) if weights else None
    row["wandb_run_id"] = record.get("wandb_run_id")
    return row


def baseline_row(paths: io.StudyPaths) -> dict[str, Any] | None:
    record = io.read_json(paths.baseline / io.TRIAL_METRICS)
    if not record:
        return None
    row = {"trial": -1, "state": "BASELINE", "model": record.get("model"), "method": "baseline (untuned)"}
    row["max_train_steps"] = 0
    row.update(record.get("metrics") or {})
    return row


def build_results(
    paths: io.StudyPaths, optuna_trials: list[Any] | None = None, superseded: set[int] | None = None
) -> pd.DataFrame:
    frame = pd.DataFrame(trial_rows(paths, optuna_trials, superseded))
    if frame.empty:
        return pd.DataFrame(columns=LEADING_COLUMNS)
    first = [c for c in LEADING_COLUMNS if c in frame.columns]
    params = sorted(c for c in frame.columns if "." in c and not c.startswith(("eval/", "delta/")))
    metrics = sorted(c for c in frame.columns if c.startswith("eval/"))
    deltas = sorted(c for c in frame.columns if c.startswith("delta/"))
    rest = [c for c in frame.columns if c not in set(first + params + metrics + deltas)]
    ordered = frame[first + params + metrics + deltas + rest].sort_values("trial").reset_index(drop=True)
    from sdsweep.ratings import merge_human_columns  # human/* from ratings.csv, when anyone has rated

    return merge_human_columns(ordered, paths.root)


def write_results(
    paths: io.StudyPaths, optuna_trials: list[Any] | None = None, superseded: set[int] | None = None
) -> pd.DataFrame:
    frame = build_results(paths, optuna_trials, superseded)
    io.atomic_write_dataframe(paths.results_csv, frame)
    try:
        # Mixed-type object columns (None + str) are fine for CSV but pyarrow wants one type.
        io.atomic_write_dataframe(
            paths.results_parquet, frame.astype({c: "string" for c in _object_columns(frame)})
        )
    except Exception as error:  # parquet is a convenience; the CSV is the record
        print(f"[sdsweep] warning: results.parquet not written ({error})")
    return frame


def _object_columns(frame: pd.DataFrame) -> list[str]:
    return [c for c in frame.columns if frame[c].dtype == object]


def is_feasible(value: Any) -> bool:
    # An empty cell (no constraints evaluated) or a CSV round trip ("True") must still read as feasible.
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return True
    if isinstance(value, str):
        return value.strip().lower() == "true"
    return bool(value)


def best_trial(results: pd.DataFrame, direction: str, feasible_only: bool = True) -> dict[str, Any] | None:
    """The best COMPLETE trial by ``objective`` (ties -> lower trial number) as a row dict.

    With ``feasible_only=False``, infeasible trials are used only when no feasible one exists.
    """
    if results.empty or "objective" not in results or "state" not in results:
        return None
    pool = results[(results["state"] == "COMPLETE") & results["objective"].notna()]
    if "trial" in pool:
        pool = pool[pool["trial"] >= 0]
    if pool.empty:
        return None
    feasible = pool[pool["feasible"].map(is_feasible)] if "feasible" in pool else pool
    if feasible.empty and feasible_only:
        return None
    pool = feasible if not feasible.empty else pool
    ranked = pool.sort_values(["objective", "trial"], ascending=[direction == "minimize", True])
    row = ranked.iloc[0].to_dict()
    return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in row.items()}
