"""Verdicts on a real study: per-unit tables, intervals in every output, the paired verdict in the closing
line and the report, training-seed replicates judged per configuration, and the paired pruner's rule.

One tiny study (2 learning rates x 2 step counts x 2 training seeds) runs through the command a user types.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from conftest import REPO

from sdsweep import io
from sdsweep.evaluation.units import read_units, summarize
from sdsweep.results.study_folder import load_study
from sdsweep.uncertainty import Interval


@pytest.fixture(scope="module")
def replicated_study(tmp_path_factory, tiny_model_dirs, tiny_clip_dir, demo_data_dir):
    root = tmp_path_factory.mktemp("verdicts")
    command = [
        sys.executable,
        "-m",
        "sdsweep",
        "+experiment=demo_tiny",
        f"paths.root={root}",
        "study=replicated",
        "tracking=none",
        "sweep.learning_rates=[1e-4,1e-2]",
        "sweep.steps=[4,8]",
        "sweep.replicates=2",
        "sweep.keep_best_k=-1",
        "eval.num_images_per_prompt=3",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:] + done.stdout[-3000:]
    return root / "replicated", done.stdout + done.stderr


@pytest.mark.slow
def test_every_trial_keeps_its_units_and_its_metrics_are_their_means(replicated_study):
    study, _ = replicated_study
    data = load_study(study)
    assert len(data.records) == 8  # 2 lr x 2 steps x 2 training seeds
    prompts = len(json.loads((study / "study.json").read_text())["eval"]["prompts"])
    for number, record in data.records.items():
        units = read_units(io.StudyPaths(study).trial(number))
        assert units is not None and len(units) == prompts * 3
        assert set(units["round"]) == {0}
        concept = units[units["group"] == "concept"]
        assert record.metrics["eval/clip_score"] == pytest.approx(concept["clip"].mean())
        assert record.metrics["eval/appropriate_rate"] == pytest.approx(units["appropriate"].mean())
        values, intervals = summarize(units)
        assert values["eval/clip_score"] == pytest.approx(record.metrics["eval/clip_score"])
        clip = Interval.from_json(record.intervals["eval/clip_score"])
        assert clip.lo <= clip.value <= clip.hi and clip.n == len(concept) and clip.method == "bootstrap"
        assert Interval.from_json(record.intervals["eval/appropriate_rate"]).method == "wilson"
        # A set statistic says why it has no interval rather than going without one silently.
        assert "set statistic" in record.intervals["eval/fd_clip"]["reason"]
    results = pd.read_csv(study / "results.csv")
    for column in ("eval/clip_score/lo", "eval/clip_score/hi", "eval/clip_score/se", "no_interval"):
        assert column in results.columns, column
    assert (results["eval/clip_score/lo"] <= results["eval/clip_score"]).all()
    assert (results["eval/clip_score"] <= results["eval/clip_score/hi"]).all()
    assert results["no_interval"].str.contains("eval/fd_clip: a set statistic").all()
    # The change from the untuned model is paired over the same units, with its own interval.
    delta = results[["delta/eval/clip_score", "delta/eval/clip_score/lo", "delta/eval/clip_score/hi"]]
    assert (delta.iloc[:, 1] <= delta.iloc[:, 0]).all() and (delta.iloc[:, 0] <= delta.iloc[:, 2]).all()


@pytest.mark.slow
def test_the_verdict_is_said_in_the_closing_line_the_report_and_optuna(replicated_study):
    study, output = replicated_study
    verdict = json.loads((study / "verdict.json").read_text())
    assert verdict["best"] is not None and verdict["separated"] in (True, False)
    assert f"verdict: {verdict['sentence']}" in output
    if not verdict["separated"]:  # the tied set is named, and how to separate it
        assert verdict["tied"] and "not separable" in verdict["sentence"]
        assert "python -m sdsweep.confirm" in output
    # Each comparison is paired over the same units: its n is the shared unit count.
    for comparison in verdict["comparisons"]:
        difference = comparison["differences"]["eval/clip_score"]
        assert difference["paired"] and difference["n"] == verdict["units"][str(verdict["best"])]
    # The pick against the untuned model, paired over the baseline's units, is said either way.
    untuned = verdict["untuned"]
    assert untuned["paired"] and untuned["n"] == verdict["units"][str(verdict["best"])]
    if verdict["beats_untuned"]:
        assert untuned["lo"] > 0 and "over the untuned model" in verdict["sentence"]
    else:
        assert untuned["lo"] <= 0 and "NOT separable from the untuned model" in verdict["sentence"]
    report = (study / "report.md").read_text()
    assert f"Verdict: {verdict['sentence']}" in report and "±" in report and "Noise: with" in report
    import optuna

    trials = optuna.load_study(study_name="replicated", storage=f"sqlite:///{study / 'study.db'}").trials
    lo, hi = trials[0].user_attrs["intervals"]["eval/clip_score"]
    assert lo <= trials[0].user_attrs["eval/clip_score"] <= hi


@pytest.mark.slow
def test_replicates_are_judged_by_their_configuration_mean(replicated_study):
    study, _ = replicated_study
    data = load_study(study)
    assert sorted(data.results["train.seed"].unique()) == [0, 1]
    best = data.best()
    assert best["replicates"] == 2 and len(best["replicate_trials"]) == 2
    rows = data.results[data.results["trial"].isin(best["replicate_trials"])]
    assert rows["train.seed"].tolist() != [rows["train.seed"].iloc[0]] * 2  # one trial per seed
    assert best["replicate_mean"] == pytest.approx(rows["eval/clip_score"].mean())
    # The pick is the configuration with the best mean over its seeds, not the best single trial.
    configs = data.results.groupby(["method.learning_rate", "train.max_train_steps"])[
        "eval/clip_score"
    ].mean()
    assert best["replicate_mean"] == pytest.approx(configs.max())
    assert "Replicates: the pick is configuration mean" in (study / "report.md").read_text()
    # The two seeds of one configuration trained differently.
    a, b = (read_units(io.StudyPaths(study).trial(int(t))) for t in best["replicate_trials"])
    assert not np.allclose(a["clip"], b["clip"])


@pytest.mark.slow
def test_the_paired_pruner_stops_a_run_only_when_it_is_worse_on_the_shared_units(replicated_study, tmp_path):
    from conftest import compose

    from sdsweep.sweep.run_executor import paired_prune_reason

    study = tmp_path / "replicated"
    shutil.copytree(replicated_study[0], study)
    paths = io.StudyPaths(study)
    best = load_study(study).best()
    units = read_units(paths.trial(int(best["trial"])))
    cfg = compose(["model=tiny", "+sweep=lr_steps", "sweep.pruner=wilcoxon"])
    for number, shift in ((90, -0.0), (91, -8.0)):
        folder = paths.trial(number)
        folder.mkdir()
        io.atomic_write_dataframe(folder / "units.csv", units.assign(clip=units["clip"] + shift))
    assert paired_prune_reason(cfg, paths, 90) is None  # the same units: no evidence
    reason = paired_prune_reason(cfg, paths, 91)
    assert reason and f"worse than trial {int(best['trial'])}" in reason and "-8" in reason


def test_a_relative_constraint_is_judged_against_the_untuned_model():
    from sdsweep.config.constraints import parse_constraint
    from sdsweep.errors import ConfigError

    guard = parse_constraint("eval/prior_clip_score >= 0.75x baseline")
    assert guard.relative and str(guard) == "eval/prior_clip_score >= 0.75x baseline"
    assert guard.bound({"eval/prior_clip_score": 88.0}) == pytest.approx(66.0)
    assert guard.satisfied({"eval/prior_clip_score": 67.0}, {"eval/prior_clip_score": 88.0})
    assert not guard.satisfied({"eval/prior_clip_score": 67.0}, {"eval/prior_clip_score": 94.0})
    assert guard.violation({"eval/prior_clip_score": 67.0}) == 1.0  # no baseline: cannot be met
    assert parse_constraint("eval/appropriate_rate >= 0.75").bound(None) == 0.75
    with pytest.raises(ConfigError, match="0.75x baseline"):
        parse_constraint("eval/prior_clip_score >= 75%")


def test_the_verdict_names_better_trials_a_constraint_ruled_out_and_says_whether_the_pick_beats_untuned():
    """The shapes demo on build 1: the drift guard rejects every trial that learned the star, so the pick is
    an lr that changed little; the sentence must say both that the guard decided and how far the pick is
    from the untuned model."""
    from sdsweep.results.verdict import Verdict, ruled_out
    from sdsweep.study.record import TrialRecord, TrialState
    from sdsweep.uncertainty import Difference

    guard = "eval/prior_clip_score >= 0.75x baseline"
    results = pd.DataFrame(
        {
            "trial": [0, 5, 8, 9],
            "state": ["COMPLETE", "COMPLETE", "COMPLETE", "FAIL"],
            "eval/clip_score": [72.0, 88.0, 70.0, 99.0],
            "feasible": [True, False, False, None],
        }
    )
    records = {
        n: TrialRecord(
            trial=n, state=TrialState.COMPLETE, violations={guard: v, "eval/appropriate_rate >= 0.75": -0.2}
        )
        for n, v in ((0, -3.0), (5, 12.5), (8, 30.0))
    }
    best = results.iloc[0].to_dict()
    objectives = [("eval/clip_score", "maximize")]
    # Trial 5 beats the pick and fails the guard; trial 8 fails it too but scores lower; trial 9 failed to run.
    assert ruled_out(results, best, objectives, records) == {5: [guard]}
    assert ruled_out(results, {**best, "feasible": False}, objectives, records) == {}  # nothing was feasible
    small_gain = Difference(mean=3.4, lo=0.3, hi=7.3, se=1.8, n=64, p_value=0.03, paired=True)
    verdict = Verdict(objectives, best=0, separated=None, untuned=small_gain, ruled_out={5: [guard]})
    assert verdict.beats_untuned is True
    sentence = verdict.sentence()
    assert "over the untuned model: Δ eval/clip_score +3.4 [+0.3, +7.3]" in sentence
    assert f"trial 5 scores higher on eval/clip_score but fails {guard}" in sentence
    no_gain = Difference(mean=1.0, lo=-2.0, hi=4.0, se=1.5, n=16, p_value=0.5, paired=True)
    verdict = Verdict(objectives, best=0, separated=None, untuned=no_gain)
    assert verdict.beats_untuned is False and "NOT separable from the untuned model" in verdict.sentence()
    minimize = Verdict([("eval/fd_clip", "minimize")], best=0, separated=None, untuned=small_gain)
    assert minimize.beats_untuned is False  # higher is worse when minimizing


def test_the_headline_says_when_the_pick_itself_may_fail_a_constraint():
    """Build 0 at eval.seed 1234 (make validate): the pick was separated on the objective, but after 80 units
    its drift-guard interval still straddled the threshold; that doubt belongs in the sentence a user reads
    first, not only in the list of uncertain trials."""
    from sdsweep.results.verdict import Comparison, Verdict
    from sdsweep.uncertainty import Difference

    guard = "eval/prior_clip_score >= 0.75x baseline"
    closest = Difference(mean=-11.9, lo=-18.1, hi=-7.5, se=2.7, n=64, p_value=2.4e-5, paired=True)
    comparisons = [Comparison(trial=4, differences={"eval/clip_score": closest}, tied=False)]
    verdict = Verdict(
        [("eval/clip_score", "maximize")],
        best=5,
        separated=True,
        comparisons=comparisons,
        uncertain={5: [guard], 7: [guard]},
        units={5: 80, 4: 64},
    )
    sentence = verdict.sentence()
    assert sentence.startswith("best trial 5, separated from every other candidate")
    assert f"but whether it meets {guard} is uncertain after 80 units" in sentence
    surely_feasible = Verdict(
        [("eval/clip_score", "maximize")],
        best=5,
        separated=True,
        comparisons=comparisons,
        uncertain={7: [guard]},
    )
    assert "whether it meets" not in surely_feasible.sentence()  # another trial's doubt is not the pick's
