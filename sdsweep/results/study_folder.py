"""The one reader of a study folder: study.json, the trial records, the baseline, results.csv, the best trial.

The report, export, generate, the app, the sweep's closing line and W&B all read a study through this
module, so they agree on what the study holds and on which trial is best. It never imports torch or
matplotlib: reading results must not depend on the renderer.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from sdsweep import io
from sdsweep.results.table import Objectives, build_results, is_feasible
from sdsweep.results.table import best_trial as _best_trial
from sdsweep.results.verdict import Verdict, judge_study, write_verdict
from sdsweep.study.record import TrialRecord, read_record, read_record_or_none

DEFAULT_OBJECTIVES = [{"metric": "eval/clip_score", "direction": "maximize"}]


class StudyFolderError(FileNotFoundError):
    """The folder is not a study (no study.json / results.csv). The message names the fix."""


def best_trial(results: pd.DataFrame, objectives: Objectives) -> dict[str, Any] | None:
    """THE best trial, as a results row: feasible trials first (by the study's constraints), then the
    objective direction(s); when no COMPLETE trial is feasible, the best infeasible one (its row says
    ``feasible`` False, and whoever names it says so). The CLI, W&B, the report and export call this."""
    return _best_trial(results, objectives, feasible_only=False)


def best_feasible_trial(results: pd.DataFrame, objectives: Objectives) -> dict[str, Any] | None:
    """``best_trial`` when it meets the constraints, else None (the report's "best feasible trial")."""
    best = best_trial(results, objectives)
    return best if best is not None and is_feasible(best.get("feasible")) else None


@dataclass
class StudyData:
    """Everything the report, export and generate read from one study folder."""

    root: Path
    info: dict[str, Any]  # study.json
    results: pd.DataFrame  # results.csv (trials only; the baseline lives in ``baseline``)
    baseline: TrialRecord | None  # baseline/metrics.json
    records: dict[int, TrialRecord] = field(default_factory=dict)  # trials/NNNN/metrics.json

    @property
    def paths(self) -> io.StudyPaths:
        return io.StudyPaths(self.root)

    @property
    def objective(self) -> tuple[str, str]:
        """(metric, direction) of the study's first objective."""
        return self.objectives[0]

    @property
    def objectives(self) -> list[tuple[str, str]]:
        """Every (metric, direction); ``best_trial`` takes this list."""
        specs = self.info.get("objectives") or DEFAULT_OBJECTIVES
        return [(o["metric"], o.get("direction", "maximize")) for o in specs]

    @property
    def params(self) -> list[str]:
        """The swept keys; for single runs (no sweep: e.g. a Hydra -m multirun) the keys that differ between them."""
        swept = list(self.info.get("params") or [])
        if swept or self.results.empty:
            return swept
        candidates = [
            c
            for c in self.results.columns
            if "." in c and not c.startswith(("eval/", "delta/", "human/", "truth/"))
        ]
        return sorted(c for c in candidates if self.results[c].nunique(dropna=True) > 1)

    @property
    def baseline_metrics(self) -> dict[str, float]:
        if self.baseline is None:
            return {}
        return {k: v for k, v in self.baseline.metrics.items() if is_number(v)}

    def in_folder(self, relative: Any) -> Path | None:
        """A path results.csv holds (``trial_dir``, ``weights_dir``: relative to the study folder) where
        the folder is now; None for an empty cell."""
        if not isinstance(relative, str) or not relative:
            return None
        return self.root / relative

    def best(self) -> dict[str, Any] | None:
        return best_trial(self.results, self.objectives)

    def verdict(self, write: bool = False) -> Verdict:
        """How sure the study is of ``best()``: see sdsweep.results.verdict for the rules."""
        constraints = list(self.info.get("constraints") or [])
        verdict = judge_study(
            self.root, self.results, self.objectives, self.best(), self.records, constraints
        )
        if write:
            write_verdict(self.root, verdict)
        return verdict

    def baseline_for(self, model: Any) -> dict[str, float] | None:
        """The untuned metrics of ``model``: ``baseline/<model>/metrics.json`` when the sweep wrote one per
        model, else ``baseline/metrics.json`` if it was measured on that model (or says nothing about it)."""
        if model is not None and not (isinstance(model, float) and pd.isna(model)):
            record = read_record(self.paths.baseline / str(model) / io.TRIAL_METRICS)
            if record:
                return _numbers(record.metrics)
        record = self.baseline
        if record is not None and (record.model in (None, model) or model is None):
            return _numbers(record.metrics)
        return None


def study_verdict(root: str | os.PathLike, results: pd.DataFrame | None = None) -> Verdict:
    """THE verdict on the best trial (paired comparisons, uncertain constraints), written to verdict.json.

    The sweep's closing line, the report, W&B, export and confirmation all call this, so they say the same."""
    data = load_study(root)
    if results is not None:
        data.results = read_results(data.paths) if results.empty else results[results["trial"] >= 0]
    return data.verdict(write=True)


def load_study(study_dir: str | os.PathLike) -> StudyData:
    root = Path(study_dir)
    paths = io.StudyPaths(root)
    info = io.read_json(paths.study_json)
    if info is None:
        raise StudyFolderError(
            f"{paths.study_json} not found: {root} is not a sdsweep study folder "
            "(run a sweep first: python -m sdsweep +sweep=lr_steps ...)."
        )
    records = {}
    for trial_dir in paths.trial_dirs():
        record = read_record_or_none(trial_dir / io.TRIAL_METRICS)  # damaged: shown from results.csv
        if record is not None and record.trial is not None:
            records[int(record.trial)] = record
    results = read_results(paths)
    if _is_own_storage(info.get("storage"), paths):
        info["storage"] = None  # an older study.json named its own study.db by where the folder was then
    return StudyData(root, info, results, read_record(paths.baseline / io.TRIAL_METRICS), records)


def _is_own_storage(url: Any, paths: io.StudyPaths) -> bool:
    """``sqlite:///<somewhere>/<study>/study.db``: the study's own storage, wherever the folder was."""
    if not isinstance(url, str) or not url.startswith("sqlite:///"):
        return False
    recorded = Path(url.removeprefix("sqlite:///"))
    return recorded.name == paths.storage_db.name and recorded.parent.name == paths.root.name


def read_results(paths: io.StudyPaths) -> pd.DataFrame:
    """results.csv when present; otherwise rows rebuilt from the trial records (a sweep still running)."""
    if paths.results_csv.is_file() and paths.results_csv.stat().st_size > 0:
        frame = pd.read_csv(paths.results_csv)
    else:
        frame = build_results(paths)
    if frame.empty:
        return frame
    frame = frame[frame["trial"] >= 0].copy()  # a baseline row (trial -1) is kept separately
    frame = _translate_legacy_columns(frame)
    frame["trial"] = frame["trial"].astype(int)
    for column in ("trial_dir", "weights_dir"):  # older tables held them relative to the cwd or absolute
        if column in frame:
            frame[column] = frame[column].map(_relative_to_study)
    return frame.sort_values("trial").reset_index(drop=True)


def _translate_legacy_columns(frame: pd.DataFrame) -> pd.DataFrame:
    """A results.csv written before wave 8 held ``learning_rate``/``max_train_steps`` beside (or instead of)
    the config keys; readers see only the config keys (``LEGACY_COLUMNS``), filled from the old names."""
    from sdsweep.results.table import LEGACY_COLUMNS

    for old, key in LEGACY_COLUMNS.items():
        if old not in frame:
            continue
        frame[key] = frame[key].fillna(frame[old]) if key in frame else frame[old]
        frame = frame.drop(columns=[old])
    return frame


def _relative_to_study(value: Any) -> Any:
    """``/old/place/study/trials/0003/weights`` -> ``trials/0003/weights``; relative ones stay as they are."""
    if not isinstance(value, str):
        return value
    parts = Path(value).parts
    for i in range(len(parts) - 2, -1, -1):
        if parts[i] == "trials" and parts[i + 1].isdigit():
            return Path(*parts[i:]).as_posix()
    return value


def read_baseline_metrics(study_dir: str | os.PathLike) -> dict[str, Any]:
    record = read_record(io.StudyPaths(Path(study_dir)).baseline / io.TRIAL_METRICS)
    return dict(record.metrics) if record else {}


def first_sample_name(data: StudyData) -> str:
    """The file name of each trial's first sample (first prompt, first seed): the contact sheets show it."""
    seeds = (data.info.get("eval") or {}).get("seeds") or [0]
    return io.sample_name(0, int(seeds[0]))


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _numbers(metrics: dict[str, Any] | None) -> dict[str, float]:
    return {k: float(v) for k, v in (metrics or {}).items() if isinstance(v, (int, float)) and v == v}


__all__ = [
    "StudyData",
    "StudyFolderError",
    "best_feasible_trial",
    "best_trial",
    "is_feasible",
    "load_study",
    "read_baseline_metrics",
    "read_results",
]
