"""``make validate``: does the demo's verdict hold across shapes builds and eval seed sets? (issue 25, item 9)

For every build (``--builds``: seeds of ``python -m sdsweep.models.shapes_build``) and every eval seed set
(``--eval-seeds``: values of ``eval.seed``) it runs the demo study as a user types it::

    python -m sdsweep +experiment=demo [model.pretrained=shapes:sd15@seedN eval.clip_model=shapes:sd15@seedN] \\
        eval.seed=S study=validate-bN-eS paths.root=ROOT tracking=none

and tabulates, per run, the pick (``load_study(...).best()``), its ground truth, and the ground truth's own best.

The ground truth's best (``TRUTH_RULE``): among trials that kept the prior, the highest
``truth/concept_accuracy + truth/prior_accuracy`` (ties all count). "Kept the prior" is the demo's own drift
guard applied to the ground truth instead of to CLIP: ``truth/prior_accuracy >= 0.75 x`` the untuned model's
(the factor is read from the study's ``eval/prior_clip_score >= 0.75x baseline`` constraint). The pick is
"in the region" when the star was learned (concept >= 3/16) and the prior kept. ``separated`` is the
study's verdict (verdict.json), "n/a" when there is nothing to compare.

Robust: the pick is in the region; or the verdict says it cannot tell the pick from a trial in the region
(tied); or no trial is in the region (on that build nothing learned the star without breaking the user's
own guard) and the pick kept the prior; or the pick is the truth's best (the right answer by the rule
above, even when its stars fall short of 3/16). The "nothing in the region" case is a correct answer to the question the study asked,
not a miss: a sweep that picks a drifted trial there has violated the user's constraint in truth. Last, a
pick that sits on the guard's line in truth (its Wilson interval of prior accuracy contains the kept-at
line) is robust when the verdict says so too: its sentence says the pick's drift guard is uncertain
(``said_it_cannot_tell``). The table names the clause that applied.

The truth is itself counted on a sample: the 32-80 images the pick received. A row that is not robust is a
"miss beyond the truth's noise" only when the pick's own Wilson 95% interval (``rate_interval`` over its
unit table's ``truth`` column) lies wholly outside the region: prior accuracy below the kept-at line, or
(when some trial is in the region) concept accuracy below 3/16. Otherwise the miss is within what the truth
can resolve on that many images, and the table says so with the interval.

``--deep N`` counts the pick's truth and the untuned model's (so the kept-at line too) again on N fresh images
per prompt (bench/deep_truth.py: the trial's weights, the study's sampler, seeds no evaluation used, the
judge only). The study's own 16-96 images leave a pick near the line undecided; 64 per prompt (256 per
group) narrow its Wilson interval to about +-0.06. The row then judges the pick on the deep sample; the other
trials keep their study counts.

Beside the table it records, per run, the quantities ``tests/test_shapes.py`` thresholds (baseline truth,
the accuracies per learning rate, Spearman correlations, drift-guard feasibility), so the tests' thresholds
can be set from the spread over builds. A finished study is read again, not re-run (``--rerun`` re-runs it).

Usage: ``python -m bench.validate --builds 0,1,2,3 --eval-seeds 1234,4321 --root experiments/validate
--out bench/validate.json [--deep 64]`` (writes the markdown table beside it, ``bench/validate.md``). Minutes per run.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

# Until wave 7 the prior counted as kept at an absolute 0.625 (at most 6 of 16 seen-shape images wrong). That
# rule is looser than the guard the demo states (lose at most a quarter of the untuned model's score): on
# build 1 it counted lr 3e-4 x 1000 as "kept" (1.0 -> 0.69 in truth, a 31% loss) and so scored the study
# wrong for honouring its own constraint. The guard's factor, applied to the truth, is the rule now; the
# absolute one is still tabulated (``pick_in_region_absolute``) for comparison with earlier tables.
PRIOR_KEPT_ABSOLUTE = 0.625
GUARD_METRIC = "eval/prior_clip_score"
DEFAULT_GUARD_FACTOR = 0.75
CONCEPT_LEARNED = 3 / 16  # three star images of 16: above the baseline's 0-1 by a margin
TRUTH_RULE = (
    "truth's best: max truth/concept_accuracy + truth/prior_accuracy among trials that kept the prior "
    "(truth/prior_accuracy >= the drift guard's factor x the untuned model's; ties all count); in region: "
    f"concept >= {CONCEPT_LEARNED:.4g} and the prior kept; robust: in region, or tied with a trial in it, or "
    "no trial in it and the pick kept the prior, or the pick is the truth's best, or the pick's truth interval "
    "contains the kept-at line and the verdict says the pick's drift guard is uncertain"
)
CONCEPT, PRIOR = "truth/concept_accuracy", "truth/prior_accuracy"
LR, STEPS = "method.learning_rate", "train.max_train_steps"
LOW_LR, GOOD_LR, FAST_LR, HIGH_LR = 1.0e-5, 3.0e-4, 1.0e-3, 3.0e-2  # the demo grid's rows


def log(message: str) -> None:
    print(f"[validate] {message}", flush=True)


def study_name(build: int, eval_seed: int) -> str:
    return f"validate-b{build}-e{eval_seed}"


def demo_command(build: int, eval_seed: int, root: Path) -> list[str]:
    command = [sys.executable, "-m", "sdsweep", "+experiment=demo"]
    if build:
        model = f"shapes:sd15@seed{build}"
        command += [f"model.pretrained={model}", f"eval.clip_model={model}"]
    return command + [
        f"eval.seed={eval_seed}",
        f"study={study_name(build, eval_seed)}",
        f"paths.root={root}",
        "tracking=none",
    ]


def finished(study_dir: Path) -> bool:
    """The sweep ended (results.csv) and its confirmation stopped (confirm/state.json says why). Trial states
    are not the test: a pruned or failed trial is a result too, and re-running its study would cost minutes."""
    import json

    state = study_dir / "confirm" / "state.json"
    if not (study_dir / "results.csv").is_file() or not state.is_file():
        return False
    try:
        return bool(json.loads(state.read_text()).get("stopped"))
    except (OSError, ValueError):
        return False


def run_study(build: int, eval_seed: int, root: Path, rerun: bool) -> tuple[Path, float | None]:
    study_dir = root / study_name(build, eval_seed)
    if finished(study_dir) and not rerun:
        log(f"{study_dir.name}: finished before, read again")
        return study_dir, None
    subprocess.run(
        [sys.executable, "-m", "sdsweep.models.shapes_build", "--seed", str(build)],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    command = demo_command(build, eval_seed, root) + (["study_reset=true"] if rerun else [])
    log(" ".join(command[1:]))
    started = time.perf_counter()
    subprocess.run(command, check=True)
    # make demo races the contenders before its report; so does this, so the table shows make demo's verdict
    subprocess.run([sys.executable, "-m", "sdsweep.confirm", str(study_dir)], check=True)
    return study_dir, time.perf_counter() - started


def _separated(study, best: dict[str, Any] | None) -> Any:
    """The study's own verdict on whether its best is separated from the rest (verdict.json)."""
    verdict = study.verdict()
    return "n/a" if verdict.separated is None else verdict.separated


def _spearman(a: pd.Series, b: pd.Series) -> float:
    return round(float(a.rank().corr(b.rank())), 3)


def _rate(results: pd.DataFrame, lr: float) -> pd.DataFrame:
    return results[np.isclose(results[LR], lr)].sort_values(STEPS)


def _floats(series: pd.Series) -> list[float]:
    return [round(float(v), 4) for v in series]


def test_measures(study) -> dict[str, Any]:
    """The quantities tests/test_shapes.py asserts on the demo study, for thresholds across builds."""
    results, base = study.results, study.baseline_metrics
    truth = results[CONCEPT] + results[PRIOR]
    ranked = truth.rank(ascending=False, method="min")
    best = study.best()
    good, low, fast, high = (_rate(results, lr) for lr in (GOOD_LR, LOW_LR, FAST_LR, HIGH_LR))
    kept = results[results[PRIOR] >= 0.85]
    return {
        "baseline": {k: base.get(k) for k in (CONCEPT, PRIOR, "eval/val_loss", "eval/clip_score")},
        "good_concept": _floats(good[CONCEPT]),
        "good_prior": _floats(good[PRIOR]),
        "low_concept_max": float(low[CONCEPT].max()),
        "low_prior_min": float(low[PRIOR].min()),
        "fast_concept_end": float(fast[CONCEPT].iloc[-1]),
        "fast_prior_end": float(fast[PRIOR].iloc[-1]),
        "fast_end_feasible": bool(fast["feasible"].iloc[-1]),
        "high_prior_max": float(high[PRIOR].max()),
        "high_val_loss_ratio_min": round(float(high["eval/val_loss"].min() / base["eval/val_loss"]), 3),
        "high_clip_ratio_max": round(float(high["eval/clip_score"].max() / base["eval/clip_score"]), 3),
        "high_prior_clip_ratio_max": round(
            float(high["eval/prior_clip_score"].max() / base["eval/prior_clip_score"]), 3
        ),
        "high_any_feasible": bool(high["feasible"].any()),
        "kept_prior_trials": [int(t) for t in kept["trial"]],
        "kept_prior_feasible": [bool(f) for f in kept["feasible"]],
        "spearman_clip_concept": _spearman(results["eval/clip_score"], results[CONCEPT]),
        "spearman_prior_clip_prior": _spearman(results["eval/prior_clip_score"], results[PRIOR]),
        "pick_truth_rank": None if best is None else int(ranked[results["trial"] == best["trial"]].iloc[0]),
    }


def guard_factor(info: dict[str, Any]) -> float:
    """The factor of the study's relative drift guard (``eval/prior_clip_score >= 0.75x baseline``)."""
    from sdsweep.config.constraints import parse_constraint

    for text in info.get("constraints") or []:
        constraint = parse_constraint(text)
        if constraint.metric == GUARD_METRIC and constraint.relative:
            return float(constraint.threshold)
    return DEFAULT_GUARD_FACTOR


def tabulate(study_dir: Path, build: int, eval_seed: int, deep: int = 0) -> dict[str, Any]:
    """One row. ``deep`` > 0: the pick's truth and the untuned model's (hence the kept-at line) are counted
    on ``deep`` fresh images per prompt (bench/deep_truth.py) instead of the study's own 16-96."""
    from sdsweep.results.study_folder import load_study

    study = load_study(study_dir)
    results = study.results
    best = study.best()
    factor = guard_factor(study.info)
    baseline_prior = float(study.baseline_metrics[PRIOR])
    deep_row: dict[str, Any] = {}
    if deep and best is not None:
        results, best, baseline_prior, deep_row = _with_deep_truth(study_dir, results, best, deep)
    prior_kept = factor * baseline_prior
    kept = results[results[PRIOR] >= prior_kept - 1e-9]
    score = kept[CONCEPT] + kept[PRIOR]
    truth_best = kept[score >= score.max() - 1e-9] if len(kept) else kept
    row: dict[str, Any] = {
        "build": build,
        "eval_seed": eval_seed,
        "study": study_dir.name,
        "pick_trial": None if best is None else int(best["trial"]),
        "pick_lr": None if best is None else float(best[LR]),
        "pick_steps": None if best is None else int(best[STEPS]),
        "pick_feasible": None if best is None else bool(best.get("feasible")),
        "pick_concept": None if best is None else float(best[CONCEPT]),
        "pick_prior": None if best is None else float(best[PRIOR]),
        "truth_best_trials": [int(t) for t in truth_best["trial"]],
        "truth_best": [f"{_lr(r[LR])} × {int(r[STEPS])}" for _, r in truth_best.iterrows()],
        "truth_best_concept": None if truth_best.empty else float(truth_best[CONCEPT].iloc[0]),
        "truth_best_prior": None if truth_best.empty else float(truth_best[PRIOR].iloc[0]),
        "separated": _separated(study, best),
        "baseline_prior": baseline_prior,
        "prior_kept_at": round(prior_kept, 4),
        **deep_row,
    }
    row["pick_is_truth_best"] = row["pick_trial"] in row["truth_best_trials"]
    verdict = study.verdict()
    row["tied"] = verdict.tied
    row["beats_untuned"] = verdict.beats_untuned
    row["sentence"] = verdict.sentence()
    row["units_of_pick"] = verdict.units.get(row["pick_trial"]) if row["pick_trial"] is not None else None
    for suffix, kept_at in (("", prior_kept), ("_absolute", PRIOR_KEPT_ABSOLUTE)):
        row.update({f"{k}{suffix}": v for k, v in judged(results, best, verdict, kept_at).items()})
    if not row["robust"] and row["pick_is_truth_best"]:
        # The truth's own answer (most stars + kept shapes among trials that kept the prior), even when its
        # stars fall short of the region's 3/16: build 3's lr 3e-4 x 1000 drew 0.168 [0.13, 0.22] of 256.
        row["robust"], row["robust_why"] = True, "the truth's best"
    row.update(truth_noise(study_dir, row))
    if said_it_cannot_tell(row, verdict):
        row["robust"], row["robust_why"] = True, "on the guard's line in truth too, and the verdict says so"
    row["measures"] = test_measures(study)
    return row


def _with_deep_truth(
    study_dir: Path, results: pd.DataFrame, best: dict[str, Any], per_prompt: int
) -> tuple[pd.DataFrame, dict[str, Any], float, dict[str, Any]]:
    """The pick's truth and the untuned model's prior on the deep sample, put where the table reads them."""
    from bench.deep_truth import DeepTruth, deep_truth
    from sdsweep import io

    trial = int(best["trial"])
    # Same weights, seeds and sampler give the same images: a table read again reuses the counts.
    saved_path = study_dir / f"deep-truth-{per_prompt}.json"
    saved = io.read_json(saved_path)
    if saved and saved.get("trial") == trial:
        pick, untuned = DeepTruth(**saved["pick"]), DeepTruth(**saved["untuned"])
    else:
        log(
            f"{study_dir.name}: deep truth, {per_prompt} images per prompt, trial {trial} and the untuned model"
        )
        pick = deep_truth(study_dir, str(trial), per_prompt)
        untuned = deep_truth(study_dir, "baseline", per_prompt)
        io.atomic_write_json(
            saved_path, {"trial": trial, "pick": pick.to_json(), "untuned": untuned.to_json()}
        )
    results = results.copy()
    at = results["trial"] == trial
    study_truth = {
        "concept": float(results.loc[at, CONCEPT].iloc[0]),
        "prior": float(results.loc[at, PRIOR].iloc[0]),
    }
    results.loc[at, CONCEPT], results.loc[at, PRIOR] = pick.concept[0], pick.prior[0]
    best = {**best, CONCEPT: pick.concept[0], PRIOR: pick.prior[0]}
    row = {
        "deep_per_prompt": per_prompt,
        "deep_pick": pick.to_json(),
        "deep_untuned": untuned.to_json(),
        "study_pick_truth": study_truth,  # what the study's own images said, for comparison
    }
    return results, best, float(untuned.prior[0]), row


def judged(results: pd.DataFrame, best: dict[str, Any] | None, verdict, kept_at: float) -> dict[str, Any]:
    """The pick against the truth, with the prior counted as kept at ``kept_at``: in the region (learned the
    star and kept the prior), and robust (in it; or tied with a trial in it; or nothing in it and the pick
    kept the prior), with the clause that made it so."""
    learned = results[CONCEPT] >= CONCEPT_LEARNED - 1e-9
    kept = results[PRIOR] >= kept_at - 1e-9
    region = sorted(int(t) for t in results.loc[learned & kept, "trial"])
    pick_kept = bool(best is not None and best[PRIOR] >= kept_at - 1e-9)
    in_region = best is not None and int(best["trial"]) in region
    if in_region:
        why = "in the region"
    elif verdict.separated is False and set(region) & set(verdict.tied):
        why = "tied with a trial in the region"
    elif not region and pick_kept:
        why = "no trial in the region; the pick kept the prior"
    else:
        why = None
    return {
        "region": region,
        "pick_kept_prior": pick_kept,
        "pick_in_region": bool(in_region),
        "robust": why is not None,
        "robust_why": why,
    }


def said_it_cannot_tell(row: dict[str, Any], verdict) -> bool:
    """A miss that is no miss: the truth itself puts the pick on the drift guard's line (its Wilson interval
    of prior accuracy contains the kept-at line), and the verdict's sentence says it cannot tell whether the
    pick meets the guard (its interval straddles the threshold after confirmation). Both measures agree that
    the pick sits on the edge of the region; the study says so instead of claiming it."""
    interval = row.get("pick_prior_ci")
    if row["robust"] or row["pick_trial"] is None or not interval or interval[0] is None:
        return False
    on_the_line = interval[0] <= row["prior_kept_at"] <= interval[1]
    guard_doubted = any(GUARD_METRIC in c for c in verdict.uncertain.get(row["pick_trial"], []))
    learned_if_any = not row["region"] or row["pick_concept"] >= CONCEPT_LEARNED - 1e-9
    return bool(on_the_line and guard_doubted and learned_if_any)


def truth_noise(study_dir: Path, row: dict[str, Any]) -> dict[str, Any]:
    """The pick's truth accuracies with their Wilson intervals, and whether a miss lies beyond them."""
    from sdsweep.evaluation.units import read_units_or_none
    from sdsweep.uncertainty import rate_interval

    if "deep_pick" in row:  # the deep sample's intervals: [mean, lo, hi, n] per group
        concept_ci, prior_ci = (row["deep_pick"][g][1:] for g in ("concept", "prior"))
    else:
        units = (
            None
            if row["pick_trial"] is None
            else read_units_or_none(study_dir / "trials" / f"{row['pick_trial']:04d}")
        )
        if units is None or "truth" not in units:
            return {"pick_concept_ci": None, "pick_prior_ci": None, "miss_beyond_truth_noise": None}
        concept, prior = (
            rate_interval(units.loc[units["truth_group"] == g, "truth"]) for g in ("concept", "prior")
        )
        concept_ci, prior_ci = [concept.lo, concept.hi, concept.n], [prior.lo, prior.hi, prior.n]
    below_guard = prior_ci[1] is not None and prior_ci[1] < row["prior_kept_at"]
    no_star = bool(row["region"]) and concept_ci[1] is not None and concept_ci[1] < CONCEPT_LEARNED
    return {
        "pick_concept_ci": concept_ci,
        "pick_prior_ci": prior_ci,
        "miss_beyond_truth_noise": bool(not row["robust"] and (below_guard or no_star)),
    }


def _noise_cell(r: dict[str, Any]) -> str:
    if r.get("miss_beyond_truth_noise") is None:
        return "n/a"
    if r["robust"]:
        return "– (robust)"
    (c_lo, c_hi, c_n), (p_lo, p_hi, p_n) = r["pick_concept_ci"], r["pick_prior_ci"]
    verdict = "yes" if r["miss_beyond_truth_noise"] else "no"
    return f"{verdict}: concept [{c_lo:.2f}, {c_hi:.2f}] of {c_n}, prior [{p_lo:.2f}, {p_hi:.2f}] of {p_n}"


def _lr(value: float) -> str:
    return f"{value:.0e}".replace("e-0", "e-")


def markdown(rows: list[dict[str, Any]]) -> str:
    head = (
        "| build | eval.seed | pick (trial: lr × steps) | pick concept / prior | truth's best (lr × steps) "
        "| its concept / prior | region (prior kept at) | pick = truth's best | pick in region | separated "
        "| tied with the pick | units | beats untuned | robust | robust at prior >= 0.625 "
        "| miss beyond the truth's noise (pick's Wilson 95%) |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n"
    )
    lines = []
    for r in rows:
        pick = (
            "none"
            if r["pick_trial"] is None
            else f"trial {r['pick_trial']}: {_lr(r['pick_lr'])} × {r['pick_steps']}"
        )
        if r["pick_feasible"] is False:
            pick += " (infeasible)"
        lines.append(
            f"| {r['build']} | {r['eval_seed']} | {pick} | {r['pick_concept']:.3f} / {r['pick_prior']:.3f} "
            f"| {', '.join(r['truth_best']) or 'none'} | "
            + (
                "n/a"
                if r["truth_best_concept"] is None
                else f"{r['truth_best_concept']:.3f} / {r['truth_best_prior']:.3f}"
            )
            + f" | {', '.join(map(str, r['region'])) or 'none'} ({r['prior_kept_at']:.2f})"
            + f" | {'yes' if r['pick_is_truth_best'] else 'no'} | {'yes' if r['pick_in_region'] else 'no'} "
            f"| {r['separated']} | {', '.join(map(str, r['tied'])) or '–'} | {r['units_of_pick']} "
            f"| {_yes(r['beats_untuned'])} | {_robust_cell(r)} | {_yes(r['robust_absolute'])} "
            f"| {_noise_cell(r)} |"
        )
    return head + "\n".join(lines) + f"\n\nRule: {TRUTH_RULE}.\n"


def _robust_cell(r: dict[str, Any]) -> str:
    return f"yes: {r['robust_why']}" if r["robust"] else "no"


def _yes(value: bool | None) -> str:
    return "n/a" if value is None else ("yes" if value else "no")


def parse_ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def main(argv: list[str] | None = None) -> int:
    from sdsweep import io

    parser = argparse.ArgumentParser(prog="python -m bench.validate", description=__doc__.split("\n")[0])
    parser.add_argument("--builds", type=parse_ints, default=[0, 1, 2, 3], help="shapes build seeds: 0,1,2,3")
    parser.add_argument("--eval-seeds", type=parse_ints, default=[1234, 4321], help="eval.seed values")
    parser.add_argument("--root", type=Path, default=Path("experiments/validate"), help="where studies go")
    parser.add_argument("--out", type=Path, default=Path("bench/validate.json"), help="JSON; .md beside it")
    parser.add_argument("--rerun", action="store_true", help="run finished studies again")
    parser.add_argument(
        "--deep",
        type=int,
        default=0,
        metavar="N",
        help="count the pick's and the untuned model's truth on N fresh images per prompt (0: the study's own)",
    )
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    rows, seconds = [], {}
    for build in args.builds:
        for eval_seed in args.eval_seeds:
            study_dir, wall = run_study(build, eval_seed, args.root.resolve(), args.rerun)
            seconds[study_dir.name] = None if wall is None else round(wall, 1)
            rows.append(tabulate(study_dir, build, eval_seed, args.deep))
            table = markdown(rows)
            io.atomic_write_json(args.out, {"rule": TRUTH_RULE, "runs": rows, "wall_seconds": seconds})
            io.atomic_write_text(args.out.with_suffix(".md"), table)
    print(table)
    in_region = sum(r["pick_in_region"] for r in rows)
    robust = sum(r["robust"] for r in rows)
    absolute = sum(r["robust_absolute"] for r in rows)
    beyond = sum(bool(r["miss_beyond_truth_noise"]) for r in rows)
    log(
        f"{in_region} of {len(rows)} picks in the region, {robust} of {len(rows)} robust "
        f"({absolute} with the prior counted kept at an absolute {PRIOR_KEPT_ABSOLUTE}); "
        f"{beyond} of {len(rows)} misses beyond the truth's own sampling noise; "
        f"JSON {args.out}, table {args.out.with_suffix('.md')}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
