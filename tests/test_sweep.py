"""The sweep engine on the tiny model: grids, milestone sharing, failures, constraints, pruning, resume."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import optuna
import pandas as pd
import pytest
from conftest import REPO, TINY_OVERRIDES

from sdsweep.study.trial_tags import FAIL_REASON, GRID_POINT, SUPERSEDED
from sdsweep.sweep.driver import run_sweep

# Cheap evaluation: these tests are about the engine, the metrics have their own tests.
FAST_EVAL = ["eval.metrics=[clip_score,appropriate_rate,val_loss]", "eval.prompts=[a photo of sks]"]


def sweep_overrides(root: Path, study: str, *extra: str) -> list[str]:
    return (
        TINY_OVERRIDES
        + FAST_EVAL
        + [
            "+sweep=lr_steps",
            "sweep.isolation=inprocess",
            "sweep.keep_best_k=-1",
            f"paths.root={root}",
            f"study={study}",
            *extra,
        ]
    )


def load_study(study_dir: Path) -> optuna.Study:
    return optuna.load_study(study_name=study_dir.name, storage=f"sqlite:///{study_dir / 'study.db'}")


def test_grid_with_shared_milestones_gives_one_row_per_point_from_two_runs(tmp_path):
    overrides = sweep_overrides(tmp_path, "grid", "sweep.learning_rates=[1e-4,1e-3]", "sweep.steps=[1,2,3]")
    outcome = run_sweep(overrides)
    assert outcome.finished and outcome.runs_launched == 2 and outcome.trials_launched == 6
    results = pd.read_csv(outcome.results_csv)
    assert len(results) == 6 and (results["state"] == "COMPLETE").all()
    assert sorted(zip(results["method.learning_rate"], results["train.max_train_steps"])) == sorted(
        (lr, steps) for lr in (1e-4, 1e-3) for steps in (1, 2, 3)
    )
    assert results["eval/clip_score"].map(math.isfinite).all()
    # Each trial folder is complete, and its saved config reproduces its own step count.
    for _, row in results.iterrows():
        trial_dir = outcome.study_dir / row["trial_dir"]  # relative to the study folder
        assert (trial_dir / "metrics.json").exists() and (trial_dir / "grid.png").exists()
        assert f"max_train_steps: {row['train.max_train_steps']}" in (trial_dir / "config.yaml").read_text()
        assert any((trial_dir / "weights").iterdir())
    # The baseline was evaluated once and every trial has deltas against it.
    assert (outcome.study_dir / "baseline" / "metrics.json").exists()
    assert results["delta/eval/clip_score"].notna().all()
    # A finished grid is reported as finished, not re-sampled.
    again = run_sweep(overrides)
    assert again.finished and again.trials_launched == 0
    assert len(load_study(outcome.study_dir).trials) == 6


def test_without_sharing_every_point_trains_separately(tmp_path):
    outcome = run_sweep(
        sweep_overrides(
            tmp_path,
            "plain",
            "sweep.learning_rates=[1e-4]",
            "sweep.steps=[1,2]",
            "sweep.share_milestones=false",
        )
    )
    assert outcome.runs_launched == 2 and outcome.states == {"COMPLETE": 2}


def test_a_failing_trial_is_recorded_and_the_sweep_goes_on(tmp_path):
    # "close-up" is two tokens: textual inversion refuses it as an initializer; "person" works.
    outcome = run_sweep(
        sweep_overrides(
            tmp_path,
            "failing",
            "method=textual_inversion",
            "sweep.learning_rates=[5e-3]",
            "sweep.steps=[2]",
            "+sweep.params={method.initializer_token: {choices: [close-up, person]}}",
        )
    )
    results = pd.read_csv(outcome.results_csv).set_index("method.initializer_token")
    assert results.loc["person", "state"] == "COMPLETE"
    assert results.loc["close-up", "state"] == "FAIL"
    assert "initializer" in results.loc["close-up", "fail_reason"]
    failed = [t for t in load_study(outcome.study_dir).trials if t.state.name == "FAIL"]
    assert "initializer" in failed[0].user_attrs[FAIL_REASON]


def test_nan_loss_fails_the_trial_with_the_reason(tmp_path):
    outcome = run_sweep(
        sweep_overrides(tmp_path, "nan", "sweep.learning_rates=[1e-4,1e12]", "sweep.steps=[3]")
    )
    results = pd.read_csv(outcome.results_csv).set_index("method.learning_rate")
    assert results.loc[1e-4, "state"] == "COMPLETE"
    assert results.loc[1e12, "state"] == "FAIL" and "diverged" in results.loc[1e12, "fail_reason"]


def test_constraint_violation_marks_the_trial_infeasible(tmp_path):
    outcome = run_sweep(
        sweep_overrides(
            tmp_path,
            "constrained",
            "sweep.learning_rates=[1e-4]",
            "sweep.steps=[1]",
            "sweep.constraints=['eval/appropriate_rate >= 0.5','eval/val_loss <= 1e-9']",
        )
    )
    record = json.loads(next((outcome.study_dir / "trials").glob("*/metrics.json")).read_text())
    assert record["feasible"] is False
    assert record["violations"]["eval/appropriate_rate >= 0.5"] <= 0
    assert record["violations"]["eval/val_loss <= 1e-09"] > 0
    (trial,) = load_study(outcome.study_dir).trials
    optuna_constraints = {k: v for k, v in trial.system_attrs.items() if k.startswith("constraints")}
    assert max(optuna_constraints.values()) > 0  # Optuna sees it as infeasible too


def test_median_pruner_stops_a_trial_with_bad_intermediate_values(tmp_path):
    outcome = run_sweep(
        sweep_overrides(
            tmp_path,
            "pruned",
            "sweep.learning_rates=[1e-4,1.1e-4,1.2e-4,0.05]",
            "sweep.steps=[8]",
            "sweep.pruner=median",
            "sweep.share_milestones=false",
            "train.loss_explosion_factor=1e12",
        )
    )
    results = pd.read_csv(outcome.results_csv).set_index("method.learning_rate")
    assert (results.loc[[1e-4, 1.1e-4, 1.2e-4], "state"] == "COMPLETE").all()
    assert results.loc[0.05, "state"] == "PRUNED"
    assert "pruned at step" in results.loc[0.05, "fail_reason"]
    pruned = [t for t in load_study(outcome.study_dir).trials if t.state.name == "PRUNED"]
    assert max(pruned[0].intermediate_values) < 8  # it stopped before the end


def test_keep_best_k_bounds_the_weights_on_disk(tmp_path):
    outcome = run_sweep(
        sweep_overrides(
            tmp_path, "keepk", "sweep.learning_rates=[1e-4,1e-3]", "sweep.steps=[1,2]", "sweep.keep_best_k=1"
        )
    )
    results = pd.read_csv(outcome.results_csv)
    kept = [d for d in results["trial_dir"] if (outcome.study_dir / d / "weights").exists()]
    assert len(kept) == 1
    assert outcome.best and outcome.best["trial_dir"] == kept[0]


def test_keep_best_k_with_two_objectives_keeps_the_whole_pareto_front(tmp_path):
    """With several objectives "best" is a front member (closest to the utopia point), so keep_best_k
    must never delete a front member's weights, even when the front is larger than k; a dominated trial
    (which can never become the best) loses them."""
    from optuna.distributions import FloatDistribution
    from optuna.trial import TrialState, create_trial

    from sdsweep import io
    from sdsweep.study.record import TrialRecord
    from sdsweep.study.record import TrialState as RecordState
    from sdsweep.study.store import StudyHandle
    from sdsweep.study.trial_tags import VIOLATIONS
    from sdsweep.sweep.recorder import enforce_keep_best_k
    from tests.conftest import compose

    cfg = compose(TINY_OVERRIDES + ["+sweep=methods", "sweep.keep_best_k=1", f"paths.root={tmp_path}"])
    assert [o.direction for o in cfg.sweep.objectives] == ["maximize", "minimize"]
    paths = io.StudyPaths.of(tmp_path, "pareto")
    handle = StudyHandle(cfg, f"sqlite:///{tmp_path / 'pareto.db'}", "pareto")
    # (clip_score up, fd_clip down): 0, 1 and 2 are the front; 3 is dominated by 1; 4 beats all but is
    # infeasible, and feasible trials exist, so it is not in the pool best_trial chooses from.
    points = [(30.0, 5.0), (25.0, 2.0), (20.0, 1.0), (24.0, 3.0), (40.0, 0.5)]
    for number, values in enumerate(points):
        violation = 1.0 if number == 4 else -1.0
        handle.study.add_trial(
            create_trial(
                state=TrialState.COMPLETE,
                values=list(values),
                params={"x": float(number)},
                distributions={"x": FloatDistribution(0, 10)},
                user_attrs={VIOLATIONS: {"eval/appropriate_rate >= 0.75": violation}},
            )
        )
        trial_dir = paths.trial(number)
        (trial_dir / io.TRIAL_WEIGHTS).mkdir(parents=True)
        (trial_dir / io.TRIAL_WEIGHTS / "model.safetensors").write_bytes(b"weights")
        TrialRecord(trial=number, state=RecordState.COMPLETE, weights=io.TRIAL_WEIGHTS).write(
            trial_dir / io.TRIAL_METRICS
        )
    enforce_keep_best_k(cfg, paths, handle)
    kept = {n for n in range(len(points)) if (paths.trial(n) / io.TRIAL_WEIGHTS).is_dir()}
    assert kept == {0, 1, 2}, kept


@pytest.mark.slow
def test_sigkill_mid_sweep_then_resume_completes_every_point_exactly_once(tmp_path):
    overrides = (
        TINY_OVERRIDES
        + FAST_EVAL
        + [
            "+sweep=lr_steps",
            "sweep.learning_rates=[1e-4,1e-3]",
            "sweep.steps=[2,6]",
            "sweep.isolation=subprocess",
            # Liveness is a heartbeat in the storage: the re-run takes the killed run over once it is silent.
            "sweep.heartbeat_interval=1",
            "sweep.grace_period=4",
            f"paths.root={tmp_path}",
            "study=killed",
        ]
    )
    command = [sys.executable, "-m", "sdsweep", *overrides]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    study_dir = tmp_path / "killed"
    first = subprocess.Popen(
        command, cwd=REPO, env=env, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    deadline = time.time() + 240
    # Kill as soon as one trial is complete, i.e. while the rest of the grid is running.
    while time.time() < deadline and first.poll() is None:
        done = [p for p in (study_dir / "trials").glob("*/metrics.json") if '"COMPLETE"' in p.read_text()]
        if done:
            break
        time.sleep(0.2)
    assert first.poll() is None, "the sweep finished before it could be killed"
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    second = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stdout + second.stderr
    assert "resuming" in second.stdout
    study = load_study(study_dir)
    complete = Counter(t.user_attrs[GRID_POINT] for t in study.trials if t.state.name == "COMPLETE")
    assert len(complete) == 4 and set(complete.values()) == {1}
    interrupted = [t for t in study.trials if t.state.name == "FAIL"]
    assert interrupted and all(t.user_attrs.get(SUPERSEDED) for t in interrupted)
    results = pd.read_csv(study_dir / "results.csv")
    assert len(results) == 4 and (results["state"] == "COMPLETE").all()


@pytest.mark.slow
def test_sweep_timeout_counts_from_the_command_start_for_its_workers_too(tmp_path):
    """sweep.timeout bounds the whole sweep: a worker that starts after it has passed (its fork server
    alone imports for seconds) claims nothing, instead of counting its own timeout from its own start."""
    overrides = sweep_overrides(
        tmp_path, "timeout", "sweep.learning_rates=[1e-4,1e-3]", "sweep.steps=[2]", "sweep.timeout=1"
    )
    overrides = [o for o in overrides if o != "sweep.isolation=inprocess"] + ["sweep.isolation=subprocess"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "sdsweep", *overrides],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "sweep.timeout=1s reached; re-run the same command to continue" in done.stdout, done.stdout[-3000:]
    assert not list((tmp_path / "timeout" / "trials").glob("*/config.yaml"))  # no run started


def test_tpe_search_switches_config_groups_with_per_method_learning_rates(tmp_path):
    outcome = run_sweep(
        TINY_OVERRIDES
        + FAST_EVAL
        + [
            "+sweep=methods",
            "sweep.isolation=inprocess",
            "sweep.params.model.choices=[tiny,tiny_sd21]",
            "sweep.params.method.choices=[lora,textual_inversion]",
            "sweep.steps=[2]",
            "sweep.objectives=[{metric: eval/clip_score, direction: maximize}]",
            "sweep.constraints=[]",
            "sweep.n_trials=3",
            f"paths.root={tmp_path}",
            "study=methods",
        ]
    )
    assert outcome.finished
    results = pd.read_csv(outcome.results_csv)
    assert len(results) == 3 and (results["state"] == "COMPLETE").all()
    for _, row in results.iterrows():
        config = (outcome.study_dir / row["trial_dir"] / "config.yaml").read_text()
        assert f"name: {row['method']}" in config
        expected = "tiny:sd21" if row["model"] == "tiny_sd21" else "tiny:sd15"
        assert expected in config  # the whole model group was switched, not just a name
        low, high = (1e-4, 5e-3) if row["method"] == "textual_inversion" else (3e-5, 1e-3)
        assert low <= row["method.learning_rate"] <= high
