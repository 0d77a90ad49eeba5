"""TrialRecord reads what older sdsweep versions wrote, and the study folder reader agrees on the best trial."""

from __future__ import annotations

import json

import pandas as pd

from sdsweep import io
from sdsweep.config.load import normalise
from sdsweep.config.validate import validate
from sdsweep.results.study_folder import best_feasible_trial, best_trial, load_study
from sdsweep.results.table import build_results
from sdsweep.study.record import SCHEMA_VERSION, TrialRecord, TrialState, read_record

# A trial record exactly as the sdsweep before TrialRecord wrote it (no schema_version).
OLD_TRIAL = {
    "trial": 3,
    "params": {"method.learning_rate": 1e-4, "train.max_train_steps": 4},
    "step": 4,
    "model": "tiny",
    "pretrained": "tiny:sd15",
    "method": "lora",
    "learning_rate": 1e-4,
    "max_train_steps": 4,
    "metrics": {"eval/clip_score": 21.5, "eval/val_loss": 0.4},
    "delta": {"delta/eval/clip_score": 0.5},
    "missing": {"fid": "too few images"},
    "warnings": ["eval/clip_score: one prompt only"],
    "feasible": True,
    "violations": {"eval/appropriate_rate >= 0.5": -0.5},
    "fail_reason": None,
    "weights": "weights",
    "run_key": "abc",
    "state": "COMPLETE",
    "objective": 21.5,
    "history": [{"step": 1, "train/loss": 0.9}],
    "evals": [{"step": 4, "eval/clip_score": 21.5}],
    "train_seconds": 1.5,
    "eval_seconds": 0.5,
    "peak_memory_gb": None,
    "predicted_peak_memory_gb": 0.1,
}
OLD_BASELINE = {
    "trial": None,
    "state": "COMPLETE",
    "step": 0,
    "model": "tiny",
    "method": "lora",
    "metrics": {"eval/clip_score": 21.0},
    "missing": {},
    "warnings": [],
    "eval_seconds": 0.3,
}


def _old_study(tmp_path, trials: list[dict]):
    paths = io.StudyPaths(tmp_path / "old")
    io.atomic_write_json(paths.study_json, {"study": "old", "objectives": [{"metric": "eval/clip_score"}]})
    (paths.baseline).mkdir(parents=True)
    (paths.baseline / io.TRIAL_METRICS).write_text(json.dumps(OLD_BASELINE))
    for raw in trials:
        folder = paths.trial(raw["trial"])
        folder.mkdir(parents=True)
        (folder / io.TRIAL_METRICS).write_text(json.dumps(raw))  # written by hand, the old way
    return paths


def test_a_record_written_without_schema_version_still_reads(tmp_path):
    paths = _old_study(tmp_path, [OLD_TRIAL])
    record = read_record(paths.trial(3) / io.TRIAL_METRICS)
    assert record is not None and record.schema_version == 0
    assert record.state is TrialState.COMPLETE and record.complete
    assert record.metrics["eval/clip_score"] == 21.5 and record.params["method.learning_rate"] == 1e-4
    assert record.violations == {"eval/appropriate_rate >= 0.5": -0.5}
    assert record.history == [{"step": 1, "train/loss": 0.9}]
    baseline = read_record(paths.baseline / io.TRIAL_METRICS)
    assert (
        baseline is not None
        and baseline.trial is None
        and baseline.numeric_metrics() == {"eval/clip_score": 21.0}
    )
    # The results table and the study reader see the old folder as before.
    frame = build_results(paths)
    assert frame.loc[0, "state"] == "COMPLETE" and frame.loc[0, "eval/clip_score"] == 21.5
    assert frame.loc[0, "missing"] == "fid: too few images"
    data = load_study(paths.root)
    assert data.records[3].run_key == "abc" and data.baseline_metrics == {"eval/clip_score": 21.0}


def test_rewriting_keeps_the_json_keys_and_unknown_ones(tmp_path):
    raw = dict(OLD_TRIAL, future_field={"kept": True})
    record = TrialRecord.from_json(raw)
    assert record.extra == {"future_field": {"kept": True}}
    path = record.write(tmp_path / io.TRIAL_METRICS)
    written = json.loads(path.read_text())
    assert written["schema_version"] == SCHEMA_VERSION
    assert written["future_field"] == {"kept": True}
    assert set(OLD_TRIAL) - {"peak_memory_gb"} <= set(written)  # None-valued optional keys may be left out
    assert written["state"] == "COMPLETE" and isinstance(written["state"], str)
    again = read_record(path)
    assert again == TrialRecord.from_json(written)
    # A state this version does not know reads as a failure that says so, not as a crash.
    odd = TrialRecord.from_json(dict(OLD_TRIAL, state="EXPLODED"))
    assert odd.state is TrialState.FAIL and "EXPLODED" in (odd.fail_reason or "")


def test_one_best_rule_feasible_first(tmp_path):
    infeasible = dict(OLD_TRIAL, trial=1, objective=30.0, feasible=False, metrics={"eval/clip_score": 30.0})
    feasible = dict(OLD_TRIAL, trial=2, objective=20.0, feasible=True, metrics={"eval/clip_score": 20.0})
    frame = build_results(_old_study(tmp_path, [infeasible, feasible]))
    objectives = [("eval/clip_score", "maximize")]
    assert best_trial(frame, objectives)["trial"] == 2  # feasible beats a better infeasible trial
    only_infeasible = frame[frame["trial"] == 1]
    assert best_trial(only_infeasible, objectives)["trial"] == 1  # the sweep, W&B and export name it
    assert best_feasible_trial(only_infeasible, objectives) is None  # the report says none is feasible
    assert best_trial(pd.DataFrame(), objectives) is None


def test_validate_changes_nothing_normalise_applies_the_shorthands():
    from tests.conftest import compose

    cfg = compose(["+sweep=lr_steps"])
    cfg.sweep.learning_rates = [1e-3, 1e-2]
    before = dict(cfg.sweep.params)
    validate(cfg)
    assert cfg.sweep.params == before
    normalise(cfg)
    assert cfg.sweep.params["method.learning_rate"].choices == [1e-3, 1e-2]


def test_failed_constraints_are_those_with_a_positive_violation():
    record = TrialRecord(
        trial=1,
        feasible=False,
        violations={"eval/appropriate_rate >= 0.75": -0.25, "eval/prior_clip_score >= 70": 1.44},
    )
    assert record.failed_constraints() == ["eval/prior_clip_score >= 70"]  # the met one is not listed
    # A hand-written list of failed constraints is taken as written.
    assert TrialRecord(trial=3, violations=["eval/appropriate_rate = 0.5 < 0.75"]).failed_constraints() == [
        "eval/appropriate_rate = 0.5 < 0.75"
    ]
    assert TrialRecord(trial=2).failed_constraints() == []
