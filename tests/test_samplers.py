"""sweep.sampler=gp|cmaes (#28): real Optuna storage, the tiny model, a SIGKILL mid-study and a resume."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import optuna
import pandas as pd
import pytest
from conftest import REPO, TINY_OVERRIDES, compose

from sdsweep.errors import ConfigError
from sdsweep.study.store import make_sampler

FAST_EVAL = ["eval.metrics=[clip_score,appropriate_rate,val_loss]", "eval.prompts=[a photo of sks]"]


def sampler_overrides(root: Path, sampler: str, *extra: str) -> list[str]:
    return (
        TINY_OVERRIDES
        + FAST_EVAL
        + [
            "+sweep=gp",
            f"sweep.sampler={sampler}",
            "sweep.steps=[2]",  # one value: only the (continuous, log) learning rate is searched
            "sweep.n_trials=4",
            "sweep.isolation=inprocess",
            "sweep.keep_best_k=-1",
            "sweep.build_report=false",
            f"paths.root={root}",
            f"study={sampler}",
            *extra,
        ]
    )


def test_the_recipe_and_each_sampler_compose_to_optunas_samplers(tmp_path):
    cfg = compose(sampler_overrides(tmp_path, "gp"))
    assert cfg.sweep.name == "gp" and cfg.sweep.constraints == ["eval/appropriate_rate >= 0.75"]
    assert isinstance(make_sampler(cfg), optuna.samplers.GPSampler)
    cfg = compose(sampler_overrides(tmp_path, "cmaes", "sweep.constraints=[]"))
    assert isinstance(make_sampler(cfg), optuna.samplers.CmaEsSampler)


def test_cmaes_with_constraints_or_two_objectives_is_a_config_error_naming_the_alternative(tmp_path):
    with pytest.raises(
        ConfigError, match=r"sweep.sampler=.*ignores constraints.*use sweep.sampler=gp or tpe"
    ):
        compose(sampler_overrides(tmp_path, "cmaes"))
    two = "sweep.objectives=[{metric: eval/clip_score, direction: maximize},{metric: eval/val_loss, direction: minimize}]"
    with pytest.raises(ConfigError, match="CMA-ES optimises one objective; use sweep.sampler=gp"):
        compose(sampler_overrides(tmp_path, "cmaes", "sweep.constraints=[]", two))
    with pytest.raises(ConfigError, match="sweep.sampler"):
        compose(sampler_overrides(tmp_path, "bayes"))
    compose(sampler_overrides(tmp_path, "gp", two))  # GP takes constraints and several objectives


@pytest.mark.parametrize("sampler", ["gp", "tpe", "random"])
def test_a_second_process_retries_the_interrupted_configuration_and_draws_new_ones(tmp_path, sampler):
    """Storage-level, no training: what a process that joins a search study (a re-run after a kill, another
    worker) claims. A sampler seeded once per process replayed the first process's draws."""
    from sdsweep.study.store import StudyHandle, trial_seed
    from sdsweep.sweep.claims import Claims
    from sdsweep.sweep.ledger import StudyLedger
    from sdsweep.sweep.search import SearchClaims

    extra = ["sweep.n_trials=8"] + ([] if sampler == "gp" else ["sweep.constraints=[]"])
    cfg = compose(sampler_overrides(tmp_path, sampler, *extra))
    url = f"sqlite:///{tmp_path / 'search.db'}"

    def process(token: str) -> tuple[Claims, SearchClaims]:
        handle = StudyHandle(cfg, url, "search")
        claims = Claims(handle, cfg.sweep, f"host driver [{token}]", token)
        ledger = StudyLedger(handle, cfg.sweep, claims, retry_below=0)
        return claims, SearchClaims(cfg, handle, claims, ledger, say=lambda _: None)

    first_claims, first = process("first")
    (_, [a]), (_, [b]) = first.next_claim(), first.next_claim()
    first_claims.hand_back([b.number], "SIGTERM received")  # b was interrupted; a still runs
    _, second = process("second")
    (_, [retry]), (_, [c]) = second.next_claim(), second.next_claim()
    assert retry.params == b.params and retry.number > b.number  # the interrupted configuration again
    assert second.handle.get_trial(retry.number).user_attrs["retry_of"] == b.number
    lrs = [s.params["method.learning_rate"] for s in (a, b, c)]
    assert len(set(lrs)) == 3, lrs  # the new draw repeats neither earlier one
    assert trial_seed(0, 1) != trial_seed(0, 2) and trial_seed(0, 1) == trial_seed(0, 1)
    assert trial_seed(None, 3) is None


@pytest.mark.slow
@pytest.mark.parametrize("sampler, extra", [("gp", []), ("cmaes", ["sweep.constraints=[]"])])
def test_a_sampler_study_resumes_after_a_kill(tmp_path, sampler, extra):
    """The re-run retries the interrupted configuration and draws new ones past those already tried (a
    sampler seeded once per process re-drew its first startup point: trial 2 repeated trial 0's lr)."""
    # Liveness is a heartbeat in the storage: the re-run takes the killed run over once it is silent.
    beat = ["sweep.heartbeat_interval=1", "sweep.grace_period=4"]
    command = [sys.executable, "-m", "sdsweep", *sampler_overrides(tmp_path, sampler, *extra, *beat)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    study_dir = tmp_path / sampler
    first = subprocess.Popen(
        command, cwd=REPO, env=env, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(first.stdout), daemon=True).start()
    deadline = time.time() + 240
    # Kill mid-study, while the second trial trains: the first is complete, the second drawn and running.
    while time.time() < deadline and first.poll() is None and not any(b"trial 1 (2/4)" in x for x in lines):
        time.sleep(0.1)
    assert first.poll() is None, b"".join(lines).decode()[-3000:]
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    study = optuna.load_study(study_name=study_dir.name, storage=f"sqlite:///{study_dir / 'study.db'}")
    interrupted = {t.number: t.params for t in study.trials if t.state.name == "RUNNING" and t.params}
    assert interrupted, "the kill left no trial running: nothing was interrupted"
    second = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    study = optuna.load_study(study_name=study_dir.name, storage=f"sqlite:///{study_dir / 'study.db'}")
    complete = [t for t in study.trials if t.state.name == "COMPLETE"]
    assert len(complete) == 4
    rates = [t.params["method.learning_rate"] for t in complete]
    assert len(set(rates)) == 4 and all(1e-6 <= r <= 1e-3 for r in rates)  # no configuration twice
    for number, params in interrupted.items():  # the interrupted configuration ran again, to the end
        retry = [t for t in complete if t.user_attrs.get("retry_of") == number]
        assert len(retry) == 1 and retry[0].params == params, (number, params, rates)
    # Nothing lost: every trial that is not a result was interrupted and then retried (a kill between ask and
    # the first suggest leaves a trial without a configuration: nothing to retry); nothing is left running.
    assert all(t.state.name in ("COMPLETE", "FAIL") for t in study.trials)
    retried = {t.user_attrs.get("retry_of") for t in complete}
    assert {t.number for t in study.trials if t.state.name == "FAIL" and t.params} <= retried
    if sampler == "gp":  # GP and TPE read each trial's feasibility, recorded in the storage
        assert all(t.constraints is not None for t in complete)
    results = pd.read_csv(study_dir / "results.csv")
    assert (results["state"] == "COMPLETE").sum() == 4 and len(results) == 4
