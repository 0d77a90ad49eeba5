"""``TrialRecord``: the one type that writes and reads a trial's (or the baseline's) ``metrics.json``.

The JSON keys are the public file format (users and tests read metrics.json), so the field names are
exactly the keys. ``schema_version`` says which shape a file has: folders written before it existed
(no field: version 0) have the same keys and still read. Keys this version does not know are kept in
``extra`` and written back, so an older sdsweep rewriting a newer record (keep_best_k) loses nothing.
"""

from __future__ import annotations

import dataclasses
import enum
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sdsweep import io

SCHEMA_VERSION = 1


class TrialState(str, enum.Enum):
    """A trial's state as recorded; the values are Optuna's state names (a ``str``, so it compares with them)."""

    COMPLETE = "COMPLETE"
    FAIL = "FAIL"
    PRUNED = "PRUNED"
    RUNNING = "RUNNING"  # only in the results table: told to Optuna, no record yet
    WAITING = "WAITING"
    DAMAGED = "DAMAGED"  # the metrics.json exists but cannot be read; fail_reason says why
    BASELINE = "BASELINE"  # the untuned model's row in the results table

    def __str__(self) -> str:
        return self.value


# Keys written only when they have a value (older files lack them; the baseline never has them).
_OPTIONAL = {
    "objective",
    "history",
    "evals",
    "train_seconds",
    "eval_seconds",
    "predicted_peak_memory_gb",
    "peak_memory_gb",
    "wandb_run_id",
    "weights_removed",
    "intervals",
}


@dataclass
class TrialRecord:
    trial: int | None  # None for the baseline
    state: TrialState = TrialState.RUNNING
    step: int = 0
    model: str | None = None
    pretrained: str | None = None
    method: str | None = None
    learning_rate: float | None = None
    max_train_steps: int | None = None
    params: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)  # eval/* -> value
    delta: dict[str, float] = field(default_factory=dict)  # delta/eval/* -> value minus the baseline's
    missing: dict[str, str] = field(default_factory=dict)  # metric -> why it was not computed
    warnings: list[str] = field(default_factory=list)
    feasible: bool | None = None  # None: no constraint was evaluated
    violations: dict[str, float] = field(default_factory=dict)  # constraint -> violation (<= 0: met)
    objective: float | None = None  # the first objective's value (COMPLETE only)
    fail_reason: str | None = None
    weights: str | None = None  # folder name inside the trial folder, None once removed
    weights_removed: str | None = None  # why keep_best_k removed them
    run_key: str | None = None
    history: list[dict[str, Any]] | None = None  # per-step train/* logs
    evals: list[dict[str, Any]] | None = None  # eval/* at each milestone up to this trial's step
    train_seconds: float | None = None
    eval_seconds: float | None = None
    predicted_peak_memory_gb: float | None = None
    peak_memory_gb: float | None = None
    wandb_run_id: str | None = None
    # metric -> its 95% interval as ``sdsweep.uncertainty.Interval.to_json()`` ({value, lo, hi, se, n,
    # method, reason}); method "none" with a reason for a metric that has none (FD, KD, val_loss).
    intervals: dict[str, dict[str, Any]] | None = None
    schema_version: int = SCHEMA_VERSION
    extra: dict[str, Any] = field(default_factory=dict)  # keys a newer version wrote

    @property
    def complete(self) -> bool:
        return self.state == TrialState.COMPLETE

    def failed_constraints(self) -> list[str]:
        """The constraints the sweep judged this trial to fail (violation > 0), in the study's order.

        A hand-written list of failed constraints in place of the {constraint: violation} mapping is taken
        as it is, so a report or card built from such a record still says what was written.
        """
        if isinstance(self.violations, dict):
            return [str(c) for c, v in self.violations.items() if isinstance(v, (int, float)) and v > 0]
        return [str(v) for v in self.violations or []]

    def numeric_metrics(self) -> dict[str, float]:
        return {
            k: v
            for k, v in self.metrics.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and v is not None
        }

    # ---- the file format ---------------------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = dict(self.extra)
        for f in dataclasses.fields(self):
            if f.name == "extra":
                continue
            value = getattr(self, f.name)
            if f.name in _OPTIONAL and value is None:
                continue
            out[f.name] = value.value if isinstance(value, TrialState) else value
        return out

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> TrialRecord:
        """Any version: 0 (no ``schema_version``, the same keys) and 1 read the same way."""
        known = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        values = {k: v for k, v in raw.items() if k in known and v is not None}
        values.setdefault("schema_version", 0)
        state = values.get("state", TrialState.RUNNING.value)
        try:
            values["state"] = TrialState(state)
        except ValueError:
            values["state"] = TrialState.FAIL
            values.setdefault("fail_reason", f"unknown recorded state {state!r}")
        record = cls(trial=raw.get("trial"), **{k: v for k, v in values.items() if k != "trial"})
        record.extra = {k: v for k, v in raw.items() if k not in known}
        return record

    def write(self, path: str | os.PathLike) -> Path:
        """Atomically; the version written is always the current one."""
        self.schema_version = SCHEMA_VERSION
        return io.atomic_write_json(path, self.to_json())


def read_record(path: str | os.PathLike) -> TrialRecord | None:
    """The record at ``path`` (a metrics.json), None when absent; ``io.DamagedFileError`` when torn."""
    raw = io.read_json(path)
    return TrialRecord.from_json(raw) if raw else None


def read_record_or_none(path: str | os.PathLike) -> TrialRecord | None:
    """Like ``read_record`` but a damaged file reads as absent (for readers that list many files)."""
    try:
        return read_record(path)
    except io.DamagedFileError:
        return None


def as_record(record: TrialRecord | dict[str, Any]) -> TrialRecord:
    """A record from a ``TrialRecord`` or its JSON form (what W&B back-fills and tests hand in)."""
    return record if isinstance(record, TrialRecord) else TrialRecord.from_json(record)


def record_path(folder: str | os.PathLike) -> Path:
    return Path(folder) / io.TRIAL_METRICS


__all__ = [
    "SCHEMA_VERSION",
    "TrialRecord",
    "TrialState",
    "as_record",
    "read_record",
    "read_record_or_none",
    "record_path",
]
