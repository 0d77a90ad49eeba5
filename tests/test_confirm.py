"""``python -m sdsweep.confirm``: racing the contenders of a finished study, in real processes on the tiny model.

The stopping rule alone; one confirmation round adding fresh, shared units to every contender; and two
workers sharing the rounds, one SIGKILLed mid-way, the rest resumed: every (round, trial) evaluated once.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from sdsweep.sweep.confirm import stop_reason

REPO = Path(__file__).resolve().parents[1]


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


def confirm_cmd(study: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "sdsweep.confirm", str(study), *args]


# ---- (a) the stopping rule -----------------------------------------------------------------------------------
def test_racing_stops_when_the_best_stands_alone():
    assert "separated" in stop_reason([5], {5: 8}, budget=32, rounds_done=0, max_rounds=None)


def test_a_lone_pick_uncertain_on_a_constraint_is_still_raced_until_the_budget():
    """The pick alone (its rivals' weights removed) but straddling the drift guard: more units settle it."""
    assert stop_reason([7], {7: 16}, budget=64, rounds_done=0, max_rounds=None, uncertain={7}) is None
    assert "budget of 64" in stop_reason(
        [7], {7: 64}, budget=64, rounds_done=3, max_rounds=None, uncertain={7}
    )
    assert "separated" in stop_reason([7], {7: 16}, budget=64, rounds_done=0, max_rounds=None, uncertain={6})


def test_racing_goes_on_while_a_contender_is_under_budget():
    assert stop_reason([1, 3], {1: 32, 3: 16}, budget=32, rounds_done=2, max_rounds=None) is None


def test_racing_stops_when_every_contender_spent_the_budget():
    reason = stop_reason([1, 3], {1: 32, 3: 40}, budget=32, rounds_done=3, max_rounds=None)
    assert "budget of 32" in reason


def test_racing_stops_at_max_rounds():
    assert "--max-rounds 2" in stop_reason([1, 3], {1: 8, 3: 8}, budget=99, rounds_done=2, max_rounds=2)
    assert stop_reason([1, 3], {1: 8, 3: 8}, budget=99, rounds_done=1, max_rounds=2) is None


# ---- a finished tiny study, once per module ------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_study(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("confirm-study")
    command = [
        sys.executable,
        "-m",
        "sdsweep",
        "+experiment=demo_tiny",
        f"paths.root={root}",
        "tracking=none",
        "sweep.steps=[2,4]",
        "sweep.isolation=inprocess",
        "sweep.keep_best_k=-1",
        "eval.num_inference_steps=2",
    ]
    done = subprocess.run(command, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    study = root / "demo_tiny"
    verdict = json.loads((study / "verdict.json").read_text())
    assert len(verdict["contenders"]) > 1, f"the tiny study must leave something to confirm: {verdict}"
    return study


def copy_of(study: Path, tmp_path: Path) -> Path:
    target = tmp_path / study.name
    shutil.copytree(study, target)
    return target


def units_of(study: Path, trial: int) -> pd.DataFrame:
    return pd.read_csv(study / "trials" / f"{trial:04d}" / "units.csv")


# ---- (b) one round -------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_a_round_adds_shared_fresh_units_to_every_contender(tiny_study, tmp_path):
    study = copy_of(tiny_study, tmp_path)
    before = json.loads((study / "verdict.json").read_text())
    results_before = pd.read_csv(study / "results.csv").set_index("trial")
    contenders = before["contenders"]

    done = subprocess.run(
        confirm_cmd(study, "--max-rounds", "1"),
        cwd=REPO,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "round 1: contenders" in done.stdout and "final verdict: best trial" in done.stdout

    after = json.loads((study / "verdict.json").read_text())
    state = json.loads((study / "confirm" / "state.json").read_text())
    assert state["rounds"][0]["contenders"] == contenders
    assert state["stopped"] == "--max-rounds 1 reached"
    assert all(state["rounds"][0]["why"][str(t)] for t in contenders)
    keys = ["group", "prompt_index", "seed"]
    round_units = []
    for trial in contenders:
        table = units_of(study, trial)
        own, fresh = table[table["round"] == 0], table[table["round"] == 1]
        assert len(fresh) == len(own) > 0  # the same number of images, on new seeds
        assert set(fresh["seed"]).isdisjoint(set(own["seed"]))
        round_units.append(fresh[keys].sort_values(keys).reset_index(drop=True))
        assert (study / "trials" / f"{trial:04d}" / "weights").is_dir()
        assert after["units"][str(trial)] == 2 * before["units"][str(trial)]
    for other in round_units[1:]:  # every contender saw the same units: paired
        pd.testing.assert_frame_equal(other, round_units[0])
    baseline = pd.read_csv(study / "baseline" / "units.csv")
    assert (baseline["round"] == 1).sum() == len(round_units[0])

    results = pd.read_csv(study / "results.csv").set_index("trial")
    metrics = json.loads((study / "trials" / f"{contenders[0]:04d}" / "metrics.json").read_text())
    table = units_of(study, contenders[0])
    concept = table[table["group"] == "concept"]
    assert metrics["metrics"]["eval/clip_score"] == pytest.approx(concept["clip"].mean())
    assert results.loc[contenders[0], "eval/clip_score"] == pytest.approx(concept["clip"].mean())
    assert (
        results.loc[contenders[0], "eval/clip_score/lo"]
        != results_before.loc[contenders[0], "eval/clip_score/lo"]
    )
    assert (study / "report.html").stat().st_mtime >= (
        study / "confirm" / "r1" / "contenders.json"
    ).stat().st_mtime

    # Re-running with the same limit does nothing more: the round is recorded, its rows are there once.
    again = subprocess.run(
        confirm_cmd(study, "--max-rounds", "1"),
        cwd=REPO,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert again.returncode == 0, again.stderr[-3000:]
    assert all(len(units_of(study, t)) == len(table) for t in contenders)


@pytest.mark.slow
def test_keep_best_k_spares_the_contenders(tiny_study, tmp_path):
    from sdsweep import io
    from sdsweep.config.load import load_yaml
    from sdsweep.study.store import StudyHandle, storage_url
    from sdsweep.sweep.recorder import enforce_keep_best_k

    study = copy_of(tiny_study, tmp_path)
    contenders = json.loads((study / "verdict.json").read_text())["contenders"]
    cfg = load_yaml(str(study / "trials" / "0000" / "config.yaml"))
    cfg = dataclasses.replace(cfg, sweep=dataclasses.replace(cfg.sweep, keep_best_k=1))
    paths = io.StudyPaths(study)
    enforce_keep_best_k(cfg, paths, StudyHandle(cfg, storage_url(cfg, study), cfg.study))
    kept = {int(d.name) for d in (study / "trials").iterdir() if (d / "weights").is_dir()}
    assert set(contenders) <= kept
    trials = {int(d.name) for d in (study / "trials").iterdir()}
    assert kept == set(contenders) or len(kept) < len(trials)  # the others went as keep_best_k=1 says


# ---- (c) two workers, one killed -----------------------------------------------------------------------------
@pytest.mark.slow
def test_two_workers_share_the_rounds_and_a_killed_one_loses_nothing(tiny_study, tmp_path):
    study = copy_of(tiny_study, tmp_path)
    args = ("--max-rounds", "2", "--grace", "3")
    logs = [open(tmp_path / f"worker{i}.log", "w") for i in range(2)]
    workers = [
        subprocess.Popen(
            confirm_cmd(study, *args), cwd=REPO, env=_env(), stdout=log, stderr=subprocess.STDOUT
        )
        for log in logs
    ]
    events = study / "confirm" / "events.log"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and not (events.is_file() and events.read_text().strip()):
        time.sleep(0.2)
    assert events.is_file(), "no worker recorded any evaluation"
    workers[1].send_signal(signal.SIGKILL)  # mid-way: its claim (if any) is left behind
    assert workers[0].wait(timeout=300) == 0, (tmp_path / "worker0.log").read_text()[-3000:]
    workers[1].wait(timeout=30)
    for log in logs:
        log.close()

    rerun = subprocess.run(
        confirm_cmd(study, *args), cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300
    )
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]

    state = json.loads((study / "confirm" / "state.json").read_text())
    assert [r["round"] for r in state["rounds"]] == [1, 2]
    lines = [json.loads(line) for line in events.read_text().splitlines()]
    done = [(e["round"], str(e["item"])) for e in lines]
    assert len(done) == len(set(done)), f"an item was appended twice: {done}"
    for entry in state["rounds"]:
        items = {(entry["round"], str(i)) for i in entry["items"]}
        assert items <= set(done)
        for trial in entry["contenders"]:
            table = units_of(study, trial)
            rows = table[table["round"] == entry["round"]]
            assert len(rows) > 0
            assert not rows.duplicated(["group", "prompt_index", "seed"]).any()
    assert not list((study / "confirm").glob("r*/*.claim"))  # every claim released or taken over
    verdict = json.loads((study / "verdict.json").read_text())
    assert verdict["sentence"] == state["rounds"][-1]["sentence"]


@pytest.mark.slow
def test_a_contender_without_weights_is_skipped_and_racing_still_ends(tiny_study, tmp_path):
    """keep_best_k may have removed a contender's weights during the sweep: it cannot be raced, so it must not
    hold the race open (it once did, for 68 rounds on the shapes demo)."""
    study = copy_of(tiny_study, tmp_path)
    verdict = json.loads((study / "verdict.json").read_text())
    lost = [t for t in verdict["contenders"] if t != verdict["best"]][0]
    shutil.rmtree(study / "trials" / f"{lost:04d}" / "weights")
    budget = 2 * len(units_of(study, verdict["best"]))
    done = subprocess.run(
        confirm_cmd(study, "--budget", str(budget)),
        cwd=REPO,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert f"trial {lost} is a contender but has no weights" in done.stdout
    assert set(units_of(study, lost)["round"]) == {0}  # never raced
    state = json.loads((study / "confirm" / "state.json").read_text())
    assert len(state["rounds"]) <= 1, state  # one round takes every raceable contender to the budget


def test_keep_best_k_keeps_feasible_trials_down_to_k_that_are_surely_feasible(tmp_path):
    """A fresh shapes build lost its pick: the three trials keep_best_k kept were feasible only by their
    point estimates, confirmation found them infeasible, and the next feasible trial (the new pick) had no
    weights left to race. Now a feasible trial straddling a threshold does not count towards k."""
    from sdsweep import io
    from sdsweep.study.record import TrialRecord, TrialState
    from sdsweep.sweep.recorder import feasible_until_k_sure, straddling

    paths = io.StudyPaths(tmp_path)
    rate = "eval/appropriate_rate"
    for number, (value, lo, hi) in enumerate(
        [(0.9, 0.6, 1.0), (0.88, 0.7, 0.95), (0.85, 0.8, 0.9), (0.8, 0.77, 0.83)]
    ):
        interval = {"value": value, "lo": lo, "hi": hi, "se": 0.05, "n": 16, "method": "wilson"}
        record = TrialRecord(
            trial=number, state=TrialState.COMPLETE, metrics={rate: value}, intervals={rate: interval}
        )
        paths.trial(number).mkdir(parents=True)
        record.write(paths.trial(number) / io.TRIAL_METRICS)
    order, constraints = [0, 1, 2, 3], [f"{rate} >= 0.75"]
    assert straddling(paths, order, constraints) == {0, 1}  # their intervals reach below 0.75
    assert feasible_until_k_sure(paths, order, 2, constraints) == {0, 1, 2, 3}
    assert feasible_until_k_sure(paths, order, 1, constraints) == {0, 2}  # at most k in doubt on top
    assert feasible_until_k_sure(paths, order, 1, []) == {0}  # no constraint: the plain top k
    assert feasible_until_k_sure(paths, order, 0, constraints) == set()
    del order[2]  # without trial 2, the first beyond doubt is 3
    assert feasible_until_k_sure(paths, order, 1, constraints) == {0, 3}
