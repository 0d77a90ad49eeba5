"""Smoke test of ``python -m bench --quick``: it runs end to end and writes a well-formed JSON; and the
small pieces the sections share (arms, verdicts, the table), which need no sweep.

No timing assertions: speed targets live in the bench output (bench/results.json), and a shared 2-core
CI machine would make them flaky. Only the structure and the sanity of the ratios are checked.
"""

from __future__ import annotations

import json
import math

import pytest

from bench import run as bench


def finite_positive(value) -> bool:
    """A ratio the bench reports must be a positive finite number."""
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def test_the_parallel_isolation_arms_are_the_sweep_cost_arms():
    from bench import parallel, sweeps

    assert parallel.ISOLATION_ARMS == {
        "plain": sweeps.ARMS["plain"],
        "inprocess": sweeps.ARMS["full"],
        "default": sweeps.ARMS["full_subprocess"],
    }


def test_verdicts_judge_each_measured_ratio_and_skip_sections_not_run():
    from bench.verdicts import RUN_TARGETS, judge, limits

    results = {"sweep": {"ratio_full_vs_plain": 0.4}, "eval": {"speedup": 1.2}, "step": {"error": "boom"}}
    verdicts = judge(results, RUN_TARGETS)

    assert verdicts == {
        "sweep_full_vs_plain": {"value": 0.4, "target": "≤ 0.5", "pass": True},
        "eval_speedup": {"value": 1.2, "target": "≥ 1.5", "pass": False},
    }
    assert limits(RUN_TARGETS) == {"sweep_full_vs_plain": 0.5, "step_overhead": 1.1, "eval_speedup": 1.5}


def test_the_table_prints_a_failed_section_as_failed():
    from bench.table import table

    results = {
        "machine": {"date": "today"},
        "sweep": {"error": "RuntimeError: no"},
        "parallel": {"error": "x"},
    }
    printed = table(results)

    assert "1. failed (RuntimeError: no)" in printed and "5. Parallel: failed (x)" in printed


@pytest.mark.slow
def test_quick_bench_writes_results(tmp_path, capsys):
    out = tmp_path / "results.json"

    # The parallel section starts worker pools (minutes); tests/test_parallel.py covers that code path.
    code = bench.main(
        [
            "--out",
            str(out),
            "--quick",
            "--sections",
            "sweep,step,eval,gpu",
            "--workdir",
            str(tmp_path / "work"),
        ]
    )

    assert code == 0, capsys.readouterr().out[-3000:]
    results = json.loads(out.read_text())
    assert {"machine", "sweep", "step", "eval", "gpu", "verdicts"} <= set(results)
    assert results["machine"]["cpu_count"] >= 1 and results["machine"]["torch"]

    arms = results["sweep"]["arms"]
    assert {"plain", "cache", "full"} <= set(arms)
    grid_size = len(results["sweep"]["grid"]["learning_rates"]) * len(results["sweep"]["grid"]["steps"])
    assert arms["plain"]["runs_launched"] == grid_size  # every grid point trained separately
    assert arms["full"]["runs_launched"] == len(results["sweep"]["grid"]["learning_rates"])  # one run per lr
    for row in arms.values():
        assert row["trials_launched"] == grid_size and row["finished"]
        assert finite_positive(row["ratio_to_plain"])

    for ratio in (
        results["step"]["ratio"],
        results["eval"]["speedup"],
        results["sweep"]["ratio_full_vs_plain"],
    ):
        assert finite_positive(ratio)
    for verdict in results["verdicts"].values():
        assert finite_positive(verdict["value"]) and isinstance(verdict["pass"], bool)

    gpu = results["gpu"]
    # The training path runs everywhere: full-size SD-1.5 on CUDA, the tiny model on CPU, through train().
    assert gpu["training"] and all("error" not in row for row in gpu["training"]), gpu
    assert {row["method"] for row in gpu["training"]} == {"full", "lora", "textual_inversion"}
    for row in gpu["training"]:
        flops = row["flops_per_step"]
        assert flops["unet"] > 0 and flops["total"] >= flops["unet"] + flops["text_encoder"]
        assert row["predicted_peak_gib"] > 0
    assert all("error" not in s and s["images_per_second"] > 0 for s in gpu["sampling"])
    assert "Targets:" in capsys.readouterr().out  # the printed table


def test_validate_runs_the_demo_as_a_user_types_it_per_build_and_eval_seed(tmp_path):
    from bench import validate

    plain = validate.demo_command(0, 1234, tmp_path)
    assert plain[1:4] == ["-m", "sdsweep", "+experiment=demo"] and not any("@seed" in a for a in plain)
    seeded = validate.demo_command(3, 4321, tmp_path)
    assert "model.pretrained=shapes:sd15@seed3" in seeded and "eval.clip_model=shapes:sd15@seed3" in seeded
    assert {"eval.seed=4321", "study=validate-b3-e4321", f"paths.root={tmp_path}", "tracking=none"} <= set(
        seeded
    )
    assert not validate.finished(tmp_path / "validate-b3-e4321")  # nothing there yet: it would run


def test_validate_calls_a_miss_beyond_noise_only_when_the_picks_truth_interval_excludes_the_region(tmp_path):
    """The ground truth is counted on the pick's own images: 22/32 seen shapes kept is not shown to be under
    a 0.74 line (Wilson [0.52, 0.82]), 4/32 is ([0.05, 0.28])."""
    import pandas as pd

    from bench import validate

    def study_with(kept: int, stars: int) -> tuple:
        study = tmp_path / f"s{kept}-{stars}"
        folder = study / "trials" / "0005"
        folder.mkdir(parents=True, exist_ok=True)
        truth = [1.0] * stars + [0.0] * (32 - stars) + [1.0] * kept + [0.0] * (32 - kept)
        groups = ["concept"] * 32 + ["prior"] * 32
        pd.DataFrame({"truth_group": groups, "truth": truth}).to_csv(folder / "units.csv", index=False)
        return study

    row = {"pick_trial": 5, "robust": False, "prior_kept_at": 0.74, "region": [7]}
    within = validate.truth_noise(study_with(22, 10), row)
    assert within["miss_beyond_truth_noise"] is False
    assert within["pick_prior_ci"][0] < 0.74 < within["pick_prior_ci"][1] and within["pick_prior_ci"][2] == 32
    assert validate.truth_noise(study_with(4, 10), row)["miss_beyond_truth_noise"] is True  # drifted, shown
    assert validate.truth_noise(study_with(30, 0), row)["miss_beyond_truth_noise"] is True  # learned nothing
    assert (
        validate.truth_noise(study_with(4, 10), {**row, "robust": True})["miss_beyond_truth_noise"] is False
    )
    cell = validate._noise_cell({**row, **within})
    assert cell.startswith("no: concept [") and "of 32" in cell


def test_deep_truth_judges_fresh_images_of_a_trial_and_of_the_untuned_model(finished_study, tmp_path):
    """``make validate DEEP=N``: the second sample, on the tiny study: it loads the trial's own weights (or the
    base model), draws N images per prompt on seeds no evaluation used, and counts the judge's verdicts per
    group with Wilson intervals; the same call draws the same images."""
    from bench import validate
    from bench.deep_truth import deep_truth

    prompts = ["a red star", "a blue circle", "a photo of sks"]  # concept, prior, and one outside the world
    trial = deep_truth(finished_study, "0", per_prompt=3, prompts=prompts, batch_size=2)
    assert trial.target == "t0000"
    for group in (trial.concept, trial.prior):
        mean, lo, hi, n = group
        assert n == 3 and 0.0 <= lo <= mean <= hi <= 1.0  # the tiny model draws noise: no shape, rate 0
    assert deep_truth(finished_study, "0", per_prompt=3, prompts=prompts, batch_size=3) == trial
    untuned = deep_truth(finished_study, "baseline", per_prompt=2, prompts=prompts[:2])
    assert untuned.target == "baseline" and untuned.prior[3] == 2
    with pytest.raises(SystemExit):
        validate.main(["--deep", "x"])  # not a number: argparse refuses before any study runs


def test_validate_names_why_a_pick_is_robust_and_clears_one_on_the_line_only_when_the_verdict_says_so():
    """Build 0 at eval.seed 1234, counted on 256 fresh images per group: the pick kept 0.719 [0.661, 0.770] of
    the seen shapes against a kept-at line of 0.738. The truth cannot tell either; the row is robust only
    because the verdict's sentence says the pick's drift guard is uncertain."""
    import pandas as pd

    from bench import validate
    from sdsweep.results.verdict import Verdict

    guard = "eval/prior_clip_score >= 0.75x baseline"
    results = pd.DataFrame({"trial": [0, 5], validate.CONCEPT: [0.0, 0.352], validate.PRIOR: [0.98, 0.719]})
    best = results.iloc[1].to_dict()
    objectives = [("eval/clip_score", "maximize")]
    doubted = Verdict(objectives, best=5, separated=True, uncertain={5: [guard]})
    sure = Verdict(objectives, best=5, separated=True)
    judged = validate.judged(results, best, doubted, kept_at=0.738)
    assert judged["region"] == [] and judged["robust"] is False and judged["robust_why"] is None
    row = {"pick_trial": 5, "pick_concept": 0.352, "prior_kept_at": 0.738, **judged}
    assert validate.said_it_cannot_tell({**row, "pick_prior_ci": [0.661, 0.770, 256]}, doubted)
    assert not validate.said_it_cannot_tell({**row, "pick_prior_ci": [0.661, 0.770, 256]}, sure)  # silent
    assert not validate.said_it_cannot_tell({**row, "pick_prior_ci": [0.60, 0.70, 256]}, doubted)  # below
    kept = validate.judged(results, best, sure, kept_at=0.70)
    assert kept["robust_why"] == "in the region" and kept["region"] == [5]
    nothing = validate.judged(results.iloc[:1], results.iloc[0].to_dict(), sure, kept_at=0.738)
    assert nothing["robust_why"] == "no trial in the region; the pick kept the prior"
