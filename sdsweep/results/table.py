"""The study's result table: one row per trial, every parameter and metric, written atomically."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Union

import pandas as pd

from sdsweep import io
from sdsweep.metric_names import INTERVAL_PARTS, LR_KEY, STEP_KEY
from sdsweep.study.record import TrialRecord, TrialState, read_record

# The learning rate and step count go by their config keys in every table (results.csv, the report, W&B,
# the app), swept or not: one name per quantity. Tables written before wave 8 also had ``learning_rate``
# and ``max_train_steps``; ``LEGACY_COLUMNS`` translates them once, where an old table is read.
LEADING_COLUMNS = ["trial", "state", "model", "method", LR_KEY, STEP_KEY]
LEGACY_COLUMNS = {"learning_rate": LR_KEY, "max_train_steps": STEP_KEY}
REPLICATE_KEY = "train.seed"  # sdsweep.config.resolve.REPLICATE_KEY: replicates differ only in it
_NOT_PARAMS = ("eval/", "delta/", "human/", "truth/")
DAMAGED = TrialState.DAMAGED.value  # the trial's metrics.json exists but cannot be read; fail_reason says why


def trial_rows(
    paths: io.StudyPaths, optuna_trials: list[Any] | None = None, superseded: set[int] | None = None
) -> list[dict[str, Any]]:
    """Rows from each trial's metrics.json; Optuna's view fills in trials that never wrote one."""
    from sdsweep.study.trial_tags import TrialTags

    rows: dict[int, dict[str, Any]] = {}
    for trial_dir in paths.trial_dirs():
        try:
            record = read_record(trial_dir / io.TRIAL_METRICS)
        except io.DamagedFileError as error:
            # One torn file must not hide the rest of the study: the trial is listed as damaged.
            number = int(trial_dir.name)
            rows[number] = {
                "trial": number,
                "state": DAMAGED,
                "fail_reason": str(error),
                "trial_dir": in_study(paths, trial_dir),
            }
            continue
        if record is None:
            continue
        row = _row_from_record(record, trial_dir, paths)
        rows[row["trial"]] = row
    superseded = set(superseded or ())
    for frozen in optuna_trials or []:
        if frozen.number in superseded:
            continue
        row = rows.setdefault(
            frozen.number, {"trial": frozen.number, "trial_dir": in_study(paths, paths.trial(frozen.number))}
        )
        if row.get("state") != DAMAGED:  # the storage is the source of truth, except for a torn record
            row["state"] = frozen.state.name
        for key, value in frozen.params.items():
            # A per-method range is its own Optuna parameter (method.learning_rate[lora]): one name here too.
            row.setdefault(LR_KEY if key.startswith(f"{LR_KEY}[") else key, value)
        reason = TrialTags.of(frozen).fail_reason
        if reason and not row.get("fail_reason"):
            row["fail_reason"] = reason
    return [rows[k] for k in sorted(rows) if k not in superseded]


def in_study(paths: io.StudyPaths, path: Path) -> str:
    """``path`` relative to the study folder (``trials/0003``): the folder can move and its table still reads."""
    return Path(path).relative_to(paths.root).as_posix()


def _row_from_record(record: TrialRecord, trial_dir: Path, paths: io.StudyPaths) -> dict[str, Any]:
    row: dict[str, Any] = {
        "trial": record.trial,
        "state": record.state.value,
        "model": record.model,
        "method": record.method,
        LR_KEY: record.learning_rate,
        STEP_KEY: record.max_train_steps,
    }
    row.update(record.params)
    row.update(record.metrics)
    row.update(interval_columns(record))
    row.update(record.delta)
    row["feasible"] = record.feasible
    row["objective"] = record.objective
    row["fail_reason"] = record.fail_reason
    row["missing"] = "; ".join(f"{k}: {v}" for k, v in record.missing.items()) or None
    row["warnings"] = "; ".join(record.warnings) or None
    row["train_seconds"] = record.train_seconds
    row["eval_seconds"] = record.eval_seconds
    row["trial_dir"] = in_study(paths, trial_dir)
    weights = record.weights
    exists = bool(weights) and (trial_dir / weights).exists()
    row["weights_dir"] = in_study(paths, trial_dir / weights) if exists else None
    if weights and not exists:
        note = f"weights {in_study(paths, trial_dir / weights)} no longer exist"
        row["warnings"] = f"{row['warnings']}; {note}" if row["warnings"] else note
    row["wandb_run_id"] = record.wandb_run_id
    return row


def baseline_row(paths: io.StudyPaths) -> dict[str, Any] | None:
    record = read_record(paths.baseline / io.TRIAL_METRICS)
    if record is None:
        return None
    row = {
        "trial": -1,
        "state": TrialState.BASELINE.value,
        "model": record.model,
        "method": "baseline (untuned)",
    }
    row[STEP_KEY] = 0
    row.update(record.metrics)
    row.update(interval_columns(record))
    return row


def interval_columns(record: TrialRecord) -> dict[str, Any]:
    """``<metric>/lo``, ``<metric>/hi`` (the 95% interval) and ``<metric>/se`` for every metric that has an
    interval; ``no_interval`` names the others with the reason (``eval/fd_clip: a set statistic ...``)."""
    out: dict[str, Any] = {}
    reasons = []
    for metric, interval in (record.intervals or {}).items():
        if interval.get("lo") is None:
            if interval.get("reason") and metric in record.metrics:
                reasons.append(f"{metric}: {interval['reason']}")
            continue
        for part in INTERVAL_PARTS:
            out[f"{metric}/{part}"] = interval.get(part)
    if record.intervals is not None:
        out["no_interval"] = "; ".join(reasons) or None
    return out


def build_results(
    paths: io.StudyPaths, optuna_trials: list[Any] | None = None, superseded: set[int] | None = None
) -> pd.DataFrame:
    frame = pd.DataFrame(trial_rows(paths, optuna_trials, superseded))
    if frame.empty:
        return pd.DataFrame(columns=LEADING_COLUMNS)
    first = [c for c in LEADING_COLUMNS if c in frame.columns]
    params = sorted(
        c for c in frame.columns if "." in c and not c.startswith(("eval/", "delta/")) and c not in first
    )
    metrics = sorted(c for c in frame.columns if c.startswith("eval/"))
    deltas = sorted(c for c in frame.columns if c.startswith("delta/"))
    rest = [c for c in frame.columns if c not in set(first + params + metrics + deltas)]
    ordered = frame[first + params + metrics + deltas + rest].sort_values("trial").reset_index(drop=True)
    from sdsweep.evaluation.ratings import (
        merge_human_columns,  # human/* from ratings.csv, when anyone has rated
    )

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


Objectives = Union[str, Sequence[Any]]


def as_objectives(objectives: Objectives) -> list[tuple[str, str]]:
    """``[(metric, direction)]`` from a bare direction (the old one-objective call: the ``objective``
    column), ``(metric, direction)`` pairs, ``{"metric", "direction"}`` dicts or ``ObjectiveSpec``s."""
    if isinstance(objectives, str):
        return [("objective", objectives)]
    pairs = []
    for item in objectives:
        if isinstance(item, dict):
            pairs.append((str(item["metric"]), str(item.get("direction", "maximize"))))
        elif hasattr(item, "metric"):
            pairs.append((str(item.metric), str(getattr(item, "direction", "maximize"))))
        else:
            metric, direction = item
            pairs.append((str(metric), str(direction)))
    return pairs


def _candidates(results: pd.DataFrame, columns: list[str], feasible_only: bool) -> pd.DataFrame | None:
    """COMPLETE trials with every objective value; feasible ones, or all when none is and allowed."""
    if results.empty or "state" not in results or any(c not in results for c in columns):
        return None
    pool = results[results["state"] == TrialState.COMPLETE.value]
    for column in columns:
        pool = pool[pd.to_numeric(pool[column], errors="coerce").map(_finite)]
    if "trial" in pool:
        pool = pool[pool["trial"] >= 0]
    if pool.empty:
        return None
    feasible = pool[pool["feasible"].map(is_feasible)] if "feasible" in pool else pool
    if feasible.empty and feasible_only:
        return None
    return feasible if not feasible.empty else pool


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def _scores(pool: pd.DataFrame, objectives: list[tuple[str, str]]) -> pd.DataFrame:
    """One column per objective, oriented so that larger is always better."""
    return pd.DataFrame(
        {
            metric: pd.to_numeric(pool[metric]) * (1.0 if direction == "maximize" else -1.0)
            for metric, direction in objectives
        },
        index=pool.index,
    )


def _front_index(scores: pd.DataFrame) -> list[Any]:
    """Rows no other row dominates (at least as good on every objective, strictly better on one)."""
    values = scores.to_numpy()
    front = []
    for i, row in enumerate(values):
        dominated = any(
            (other >= row).all() and (other > row).any() for j, other in enumerate(values) if j != i
        )
        if not dominated:
            front.append(scores.index[i])
    return front


def replicate_groups(pool: pd.DataFrame) -> list[list[Any]] | None:
    """Row labels of each configuration's replicates (trials that differ only in ``train.seed``), or None
    when the study has no replicates."""
    if REPLICATE_KEY not in pool or pool[REPLICATE_KEY].nunique(dropna=True) < 2:
        return None
    keys = [c for c in pool.columns if "." in c and c != REPLICATE_KEY and not c.startswith(_NOT_PARAMS)]
    if not keys:
        return [list(pool.index)]
    return [list(rows.index) for _, rows in pool.groupby(keys, dropna=False, sort=True)]


def _best_configuration(
    pool: pd.DataFrame, groups: list[list[Any]], pairs: list[tuple[str, str]]
) -> dict[str, Any]:
    """The configuration with the best mean objective(s) over its seeds; its row is the replicate nearest that
    mean (its weights are exported), with ``replicates``, ``replicate_mean``/``_sd``/``_lo``/``_hi``."""
    from sdsweep.uncertainty import replicate_interval

    means = pd.DataFrame(
        [{m: pd.to_numeric(pool.loc[g, m]).mean() for m, _ in pairs} for g in groups],
        index=[min(int(pool.loc[i, "trial"]) for i in g) for g in groups],
    )
    means["trial"] = means.index
    winner = best_trial(means.assign(state=TrialState.COMPLETE.value), pairs, feasible_only=False)
    assert winner is not None
    group = next(g for g in groups if min(int(pool.loc[i, "trial"]) for i in g) == int(winner["trial"]))
    metric = pairs[0][0]
    values = pd.to_numeric(pool.loc[group, metric])
    nearest = (values - values.mean()).abs().sort_values(kind="stable").index[0]
    row = pool.loc[nearest].to_dict()
    spread = replicate_interval(values.to_numpy())
    row.update(
        replicates=len(group),
        replicate_trials=sorted(int(pool.loc[i, "trial"]) for i in group),
        replicate_mean=spread.value,
        replicate_sd=float(values.std(ddof=1)),
        replicate_lo=spread.lo,
        replicate_hi=spread.hi,
    )
    return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in row.items()}


def pareto_front(results: pd.DataFrame, objectives: Objectives, feasible_only: bool = True) -> list[int]:
    """Trial numbers of the Pareto front over the same pool ``best_trial`` chooses from."""
    pairs = as_objectives(objectives)
    pool = _candidates(results, [m for m, _ in pairs], feasible_only)
    if pool is None:
        return []
    return sorted(int(pool.loc[i, "trial"]) for i in _front_index(_scores(pool, pairs)))


def best_trial(
    results: pd.DataFrame, objectives: Objectives, feasible_only: bool = True
) -> dict[str, Any] | None:
    """THE best trial of a study as a row dict; the report, CLI, W&B and export all call this.

    ``objectives`` is ``[(metric, direction), ...]`` (dicts and ``ObjectiveSpec``s work too), or a bare
    ``"maximize"``/``"minimize"`` for the ``objective`` column. The pool is the COMPLETE trials that
    have every objective value; only feasible ones, unless ``feasible_only=False`` and none is feasible.

    One objective: the best value, ties -> the lower trial number.
    Several objectives: the member of the Pareto front closest (Euclidean) to the utopia point after
    min-max normalising each objective over the front (each objective's best front value -> 1, worst -> 0;
    an objective on which the front agrees counts 0 for everyone), ties -> the lower trial number.
    Every multi-objective "best" is therefore on the front, and it is the same trial everywhere.
    """
    pairs = as_objectives(objectives)
    pool = _candidates(results, [m for m, _ in pairs], feasible_only)
    if pool is None:
        return None
    groups = replicate_groups(pool)
    if groups is not None:  # training-seed replicates: the pick is by each configuration's mean
        return _best_configuration(pool, groups, pairs)
    scores = _scores(pool, pairs)
    if len(pairs) == 1:
        distance = -scores.iloc[:, 0]
    else:
        front = scores.loc[_front_index(scores)]
        span = (front.max() - front.min()).replace(0.0, float("inf"))
        shortfall = (front.max() - front) / span  # 0 at the best front value, 1 at the worst
        distance = (shortfall**2).sum(axis=1) ** 0.5
    ranked = pd.DataFrame({"distance": distance, "trial": pool.loc[distance.index, "trial"]})
    winner = ranked.sort_values(["distance", "trial"]).index[0]
    row = pool.loc[winner].to_dict()
    return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in row.items()}
