"""What is sent to W&B, computed without W&B: names, configs with secrets stripped, per-step rows, summaries,
and the results table in JSON-safe form. Pure functions, so they are tested without a tracking run.
"""

from __future__ import annotations

import math
import re
from typing import Any

from sdsweep.config.resolve import flatten
from sdsweep.config.schema import Config
from sdsweep.results.table import interval_columns
from sdsweep.study.plan import canonical, short_params
from sdsweep.study.record import TrialRecord, as_record

# Config keys whose last part is one of these words may hold credentials; they are never logged.
_SECRET_WORDS = {"key", "apikey", "token", "secret", "password", "passwd", "credentials"}
# Schema fields that name a vocabulary token of the model, not a credential.
_NOT_SECRET = {"method.placeholder_token", "method.initializer_token"}
_WORD = re.compile(r"[a-z0-9]+")


def is_secret_key(key: str) -> bool:
    """True for keys such as ``api_key``, ``WANDB_API_KEY``, ``hf.token``, ``db_password``."""
    if key in _NOT_SECRET:
        return False
    lowered = key.lower()
    words = set(_WORD.findall(lowered))
    return bool(words & _SECRET_WORDS) or any(w in lowered for w in ("apikey", "secret", "password", "token"))


_URL_PASSWORD = re.compile(r"(://[^/:@\s]+:)[^@\s]+@")


def strip_secrets(values: dict[str, Any]) -> dict[str, Any]:
    """A copy without secret-looking keys, recursing into nested dicts; URL passwords become ``***``."""
    clean: dict[str, Any] = {}
    for key, value in values.items():
        if is_secret_key(str(key)):
            continue
        if isinstance(value, str):
            value = _URL_PASSWORD.sub(r"\1***@", value)  # sweep.storage=postgresql://user:pw@host/db
        clean[key] = strip_secrets(value) if isinstance(value, dict) else value
    return clean


def run_name(trial_number: int, params: dict[str, Any]) -> str:
    """``t003 lr=1e-04 steps=20``: sortable in the W&B run list, readable at a glance."""
    described = short_params(params)
    return f"t{trial_number:03d} {described}".rstrip()


def trial_config(cfg: Config, study: str, trial_number: int, params: dict[str, Any]) -> dict[str, Any]:
    """The run config: the whole flattened trial config plus the swept params (which win), secrets stripped.

    Swept values go through ``canonical``: a step count read back as ``10.0`` (SQLite, JSON) is logged as 10.
    """
    values = flatten(cfg)
    values.update({k: canonical(v) for k, v in params.items()})
    values.update({"study": study, "trial": trial_number})
    return strip_secrets(values)


# Study-level config: what is the same for every trial. Hyperparameter sections (train.*, method.*
# and swept keys) are left out, so the study run is no fake point on parallel coordinates.
_STUDY_SECTIONS = ("study", "sweep.", "data.", "eval.", "model.", "method.name", "tracking.project")


def study_config(cfg: Config, study: str) -> dict[str, Any]:
    """The study run's config: study-level keys only, no per-trial hyperparameters."""
    swept = set(cfg.sweep.params) if cfg.sweep else set()
    swept_groups = {k for k in swept if "." not in k}  # model, method: a swept group has no single value

    def per_trial(key: str) -> bool:
        return key in swept or key.split(".", 1)[0] in swept_groups

    values = {
        k: v
        for k, v in flatten(cfg).items()
        if k.startswith(_STUDY_SECTIONS) and not k.startswith("sweep.params") and not per_trial(k)
    }
    values["study"] = study
    values["sweep.swept"] = sorted(swept)
    return strip_secrets(values)


def finite(value: Any) -> Any:
    # W&B stores NaN as a string in history; a missing point is clearer on charts.
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def history_by_step(
    record: TrialRecord | dict[str, Any], images: dict[str, list[tuple[int, Any]]] | None = None
) -> list[tuple[int, dict[str, Any]]]:
    """Merge training history, milestone evaluations and images into one row per step, in step order.

    W&B rejects a step lower than one already logged, so everything logged at the same step must go
    in one ``log`` call. Image values stay whatever the caller passed (converted when logging).
    """
    record = as_record(record)
    rows: dict[int, dict[str, Any]] = {}
    for entry in record.history or []:
        step = int(entry["step"])
        rows.setdefault(step, {}).update({k: finite(v) for k, v in entry.items() if k != "step"})
    for entry in record.evals or []:
        step = int(entry["step"])
        scalars = {k: finite(v) for k, v in entry.items() if k != "step" and isinstance(v, (int, float))}
        rows.setdefault(step, {}).update(scalars)
    for key, series in (images or {}).items():
        for step, image in series:
            if image is not None:
                rows.setdefault(int(step), {})[key] = image
    return sorted(rows.items())


def trial_summary(record: TrialRecord | dict[str, Any]) -> dict[str, Any]:
    """Final metrics and the trial's outcome, overriding W&B's "last logged value" summary."""
    record = as_record(record)
    summary: dict[str, Any] = {k: finite(v) for k, v in record.metrics.items()}
    summary.update({k: finite(v) for k, v in interval_columns(record).items()})  # <metric>/lo, /hi, /se
    summary.update({k: finite(v) for k, v in record.delta.items()})
    summary["state"] = record.state.value
    summary["fail_reason"] = record.fail_reason
    for key in ("trial", "objective", "feasible", "step", "train_seconds", "eval_seconds"):
        if getattr(record, key) is not None:
            summary[key] = finite(getattr(record, key))
    return summary


# Counts that pandas turns into floats when a row lacks them (the baseline has no trial number).
_INTEGER_COLUMN = re.compile(r"(^|[._/])(trial|step|steps|seed|\w+_steps)$")


def table_value(value: Any) -> Any:
    if value is None:
        return None
    if hasattr(value, "item") and callable(value.item):  # numpy scalars
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def results_table_data(results: Any) -> tuple[list[str], list[list[Any]]]:
    """Columns and JSON-safe rows of the results DataFrame (NaN -> None, numpy -> Python)."""
    columns = [str(c) for c in results.columns]
    rows = [[table_value(v) for v in row] for row in results.itertuples(index=False, name=None)]
    for index, column in enumerate(columns):
        if not _INTEGER_COLUMN.search(column):
            continue
        values = [row[index] for row in rows if row[index] is not None]
        if values and all(isinstance(v, (int, float)) and float(v).is_integer() for v in values):
            for row in rows:  # a NaN-holed int column comes back from pandas as floats: 10.0 -> 10
                if row[index] is not None and not isinstance(row[index], bool):
                    row[index] = int(row[index])
    return columns, rows


def best_trial_summary(cfg: Config, results: Any) -> dict[str, Any]:
    """``best/*`` summary keys for the study run (empty when no trial completed)."""
    from sdsweep.results.study_folder import best_trial

    objectives = cfg.sweep.objectives if cfg.sweep and cfg.sweep.objectives else "maximize"
    best = best_trial(results, objectives)  # the one rule: the CLI, the report and export use it
    if best is None:
        return {"best/trial": None}
    return {f"best/{k}": table_value(v) for k, v in best.items() if table_value(v) is not None}
