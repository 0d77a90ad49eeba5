"""The known-answer shapes world: the judge is exact on the world, and the pretrained model behaves as built.

The slow tests build the shapes model once per session (minutes on a CPU) and run the demo study on it;
their thresholds come from measured numbers (see the comments) with a margin.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from sdsweep.errors import ConfigError
from sdsweep.evaluation import judge
from sdsweep.models import shapes, shapes_build
from tests.conftest import compose

# The build the slow tests run on: SDSWEEP_TEST_SHAPES_SEED=N selects shapes:sd15@seedN (default 0, the build
# `make demo` uses). The thresholds below hold on every build measured (builds 0-3), not on one.
BUILD_SEED = int(os.environ.get("SDSWEEP_TEST_SHAPES_SEED", "0"))
BUILD_ID = shapes.shapes_id("sd15", BUILD_SEED)
BUILD = [f"model.pretrained={BUILD_ID}", f"eval.clip_model={BUILD_ID}"] if BUILD_SEED else []


def test_judge_names_every_world_shape_and_colour_exactly():
    scenes = list(shapes.scenes(300, seed=11))
    verdicts = [judge.judge_image(shapes.draw(s)) for s in scenes]
    wrong = [(s, v) for s, v in zip(scenes, verdicts) if (v.shape, v.colour) != (s.shape, s.colour)]
    assert not wrong, wrong[:3]
    assert {s.shape for s in scenes} == set(shapes.SHAPES)


def test_judge_sees_nothing_in_a_blank_or_noise_image():
    blank = Image.new("RGB", (32, 32), shapes.BACKGROUND)
    assert judge.judge_image(blank).shape is None
    noise = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    assert judge.judge_image(Image.fromarray(noise)).shape is None


def test_judge_prompts_splits_concept_from_prior_and_reads_placeholders():
    star = shapes.Scene("star", "red", 18, 0, 0)
    circle = shapes.Scene("circle", "blue", 18, 0, 0)
    images = [shapes.draw(star), shapes.draw(star), shapes.draw(circle), shapes.draw(circle)]
    prompts = ["a red star", "a red <star>", "a blue circle", "a green circle"]
    assert judge.judge_prompts(images, prompts) == {
        "truth/concept_accuracy": 1.0,
        "truth/prior_accuracy": 0.5,  # the green circle came out blue
    }
    # A prompt outside the world has no ground truth, and an empty group is left out, not reported as 0.
    assert judge.judge_prompts([images[0]], ["a photo of sks"]) == {}
    with pytest.raises(ValueError, match="eval.judge='cubes'"):
        judge.judge_units("cubes", images, prompts)


def test_tokenizer_has_the_star_and_a_one_token_initializer():
    tokenizer = shapes.build_tokenizer()
    # "star" is a word of the vocabulary (the UNet's text encoder knows it from CLIP), and "triangle" is one
    # token, as textual inversion's initializer must be. Other words may be two or three BPE pieces.
    assert tokenizer.tokenize("star") == ["star</w>"] and tokenizer.tokenize("triangle") == ["triangle</w>"]
    for word in (*shapes.SHAPES, *shapes.COLOURS):
        assert tokenizer.unk_token not in tokenizer.tokenize(word), word


def test_concept_dataset_holds_only_captioned_stars(tmp_path):
    folder = shapes.write_concept_dataset(tmp_path / "stars", num_images=8)
    rows = [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines()]
    assert len(rows) == 8 and all(row["text"].endswith(" star") for row in rows)
    # Every colour equally often: an unbalanced set taught "a red star" the yellow stars' colour.
    assert sorted(row["text"] for row in rows) == sorted(
        f"a {c} star" for c in shapes.COLOURS for _ in (1, 2)
    )
    for row in rows:
        verdict = judge.judge_image(Image.open(folder / row["file_name"]))
        assert verdict.shape == "star" and verdict.colour in row["text"]


def test_demo_recipes_compose_on_the_shapes_world():
    cfg = compose(["+experiment=demo"])
    assert cfg.model.pretrained == "shapes:sd15" and cfg.eval.judge == "shapes"
    version = f"v{shapes.SHAPES_VERSION}"  # the conf paths follow the cache layout of the current build
    assert cfg.data.path.endswith(f"shapes/data-{version}") and not cfg.data.random_flip
    assert cfg.eval.clip_model == "shapes:sd15"  # the build's own CLIP, by id
    # eval/clip_score is about the star prompts; the seen shapes are prior prompts, guarded by a constraint.
    assert all(judge.parse_prompt(p).concept for p in cfg.eval.prompts)
    assert not any(judge.parse_prompt(p).concept for p in cfg.eval.prior_prompts)
    assert "eval/prior_clip_score >= 0.75x baseline" in cfg.sweep.constraints
    assert compose(["+experiment=demo_tiny"]).model.pretrained.startswith("tiny:")
    methods = compose(["+experiment=demo_methods"])
    assert list(methods.sweep.params["model"].choices) == ["shapes", "tiny_sd21", "tiny_sdxl"]
    assert len(methods.sweep.params["method"].choices) == 4


def test_a_build_seed_selects_its_own_cache_folder_and_clip(tmp_path):
    assert shapes.parse_shapes_model_id("shapes:sd15") == ("sd15", 0)
    assert shapes.parse_shapes_model_id("shapes:sd15@seed3") == ("sd15", 3)
    assert (
        shapes.parse_shapes_id("shapes:sd15@seed3") == "sd15" and shapes.parse_shapes_id("tiny:sd15") is None
    )
    version = f"v{shapes.SHAPES_VERSION}"
    assert shapes.model_dir("sd15", tmp_path) == tmp_path / "shapes" / f"sd15-{version}"  # today's path
    assert shapes.model_dir("sd15", tmp_path, seed=3) == tmp_path / "shapes" / f"sd15-{version}-seed3"
    assert shapes.resolve_clip("shapes:sd15@seed3", tmp_path) == str(shapes.clip_dir(tmp_path, 3))
    assert shapes.clip_dir(tmp_path, 3).parent.name == f"sd15-{version}-seed3"
    with pytest.raises(ConfigError, match=r"shapes:sd15@seed<N>"):
        shapes.parse_shapes_model_id("shapes:sd15@three")


def test_a_model_scored_by_another_builds_clip_is_a_config_error():
    cfg = compose(
        ["+experiment=demo", "model.pretrained=shapes:sd15@seed3", "eval.clip_model=shapes:sd15@seed3"]
    )
    assert cfg.model.pretrained == cfg.eval.clip_model == "shapes:sd15@seed3"
    with pytest.raises(ConfigError) as error:
        compose(["+experiment=demo", "model.pretrained=shapes:sd15@seed3"])
    message = str(error.value)
    assert "shapes:sd15@seed3" in message and "'shapes:sd15'" in message
    assert "eval.clip_model=shapes:sd15@seed3" in message  # the fix
    with pytest.raises(ConfigError, match="different shapes builds"):  # a folder inside another build, too
        compose(["+experiment=demo", "eval.clip_model=/cache/shapes/sd15-v3-seed2/clip"])


def test_the_build_command_and_make_demo_take_a_seed():
    command = [sys.executable, "-m", "sdsweep.models.shapes_build", "--help"]
    out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    assert "--seed" in out
    dry = subprocess.run(
        ["make", "-n", "demo", "SHAPES_SEED=3", "STAMP="], capture_output=True, text=True, check=True
    ).stdout
    assert "shapes_build --seed 3" in dry
    assert "model.pretrained=shapes:sd15@seed3 eval.clip_model=shapes:sd15@seed3 study=demo-seed3" in dry
    plain = subprocess.run(
        ["make", "-n", "demo", "STAMP="], capture_output=True, text=True, check=True
    ).stdout
    assert "shapes_build --seed 0" in plain and "@seed" not in plain and "study=" not in plain


# ---- on the pretrained model (slow: the build takes minutes once per session) -------------------------------
# Thresholds come from the numbers measured on the default build and the `make demo` grid (listed at the end
# of this file), with a margin. Every study runs in-process on the one session build.
@pytest.fixture(scope="session")
def shapes_model():
    return shapes_build.ensure_shapes_model(seed=BUILD_SEED)


def _study(root, *overrides: str):
    from sdsweep.sweep.driver import run_sweep

    common = ["tracking=none", "sweep.isolation=inprocess", f"paths.root={root}"]
    outcome = run_sweep([*overrides, *BUILD, *common])
    assert outcome.finished
    return outcome, pd.read_csv(outcome.study_dir / "results.csv")


@pytest.fixture(scope="session")
def demo_study(shapes_model, tmp_path_factory):
    """`make demo`: 4 learning rates x 3 step counts, one run per rate."""
    outcome, results = _study(tmp_path_factory.mktemp("shapes-demo"), "+experiment=demo")
    print("\n" + results[[*GRID, *TRUTH, "eval/clip_score", "eval/val_loss", "feasible"]].to_string())
    return results, outcome


GRID = ["method.learning_rate", "train.max_train_steps"]
TRUTH = ["truth/concept_accuracy", "truth/prior_accuracy"]


def _baseline(study_dir) -> dict:
    found = sorted(study_dir.rglob("baseline*/metrics.json")) or sorted(study_dir.rglob("*baseline*.json"))
    assert found, f"no baseline metrics under {study_dir}"
    data = json.loads(found[0].read_text())
    return data.get("metrics", data)


def _rate(results, lr) -> pd.DataFrame:
    return results[np.isclose(results["method.learning_rate"], lr)].sort_values("train.max_train_steps")


@pytest.mark.slow
def test_baseline_draws_the_seen_shapes_but_not_the_star(demo_study):
    baseline = _baseline(demo_study[1].study_dir)
    print("baseline", {k: baseline[k] for k in TRUTH})
    assert baseline["truth/concept_accuracy"] <= BASELINE_CONCEPT_MAX
    assert baseline["truth/prior_accuracy"] >= BASELINE_PRIOR_MIN


@pytest.mark.slow
def test_a_good_lr_learns_the_star_as_steps_grow(demo_study):
    good = _rate(demo_study[0], GOOD_LR)
    concept = good["truth/concept_accuracy"].tolist()
    assert concept[-1] >= concept[0] + GOOD_CONCEPT_GAIN and concept[-1] >= GOOD_CONCEPT_MIN, concept
    assert good["truth/prior_accuracy"].iloc[-1] >= GOOD_PRIOR_MIN  # ... and the seen shapes mostly hold
    low = _rate(demo_study[0], LOW_LR)
    assert low["truth/concept_accuracy"].max() <= BASELINE_CONCEPT_MAX  # too low an lr: nothing changes
    assert low["truth/prior_accuracy"].min() >= LOW_PRIOR_MIN


@pytest.mark.slow
def test_a_fast_lr_learns_the_star_sooner_and_the_prior_drifts(demo_study):
    """A full fine-tune on star images alone: the faster rate draws more stars, and soon draws them for
    every prompt (language drift, what DreamBooth's prior preservation exists to stop)."""
    results = demo_study[0]
    fast, good = _rate(results, FAST_LR), _rate(results, GOOD_LR)
    assert fast["truth/concept_accuracy"].iloc[-1] >= good["truth/concept_accuracy"].iloc[-1]
    assert fast["truth/prior_accuracy"].iloc[-1] <= FAST_PRIOR_MAX, fast["truth/prior_accuracy"].tolist()


@pytest.mark.slow
def test_too_high_an_lr_breaks_the_prior_and_the_drift_metrics_flag_it(demo_study):
    results, outcome = demo_study
    baseline = _baseline(outcome.study_dir)
    high = _rate(results, HIGH_LR)
    assert (high["truth/prior_accuracy"] <= HIGH_PRIOR_MAX).all(), high["truth/prior_accuracy"].tolist()
    # Drift: held-out loss well above the base model's, prior CLIP far below, and the drift guard marks it
    # infeasible. The star prompts' CLIP is not asserted: build 1's CLIP scores the noise 54-58 against the
    # untuned model's 29.5 on the star prompts (1.96x), build 0's scores it 0.
    assert (high["eval/val_loss"] >= HIGH_VAL_LOSS_RATIO * baseline["eval/val_loss"]).all()
    assert (high["eval/prior_clip_score"] <= HIGH_CLIP_RATIO * baseline["eval/prior_clip_score"]).all()
    assert not high["feasible"].any()


@pytest.mark.slow
def test_the_drift_guard_rejects_the_trials_that_forgot_the_prior(demo_study):
    """eval/prior_clip_score >= 0.75x baseline (conf/experiment/demo.yaml) keeps the trials whose seen shapes hold and
    rejects those that learned the star by drawing it for every prompt."""
    results = demo_study[0]
    fast_end = _rate(results, FAST_LR).iloc[-1]
    assert fast_end["truth/prior_accuracy"] <= FAST_PRIOR_MAX and not fast_end["feasible"]
    # Trials that kept 14 of 16 seen shapes or more stay candidates (how many there are depends on the build:
    # 4, 3 and 1 measured; the untuned-like lr 1e-5 x 100 trial is always one).
    kept = results[results["truth/prior_accuracy"] >= KEPT_PRIOR_MIN]
    assert len(kept) >= 1 and kept["feasible"].all(), kept[[*GRID, "eval/prior_clip_score", "feasible"]]


def _separated(outcome) -> bool | None:
    """The study's verdict on whether its best is separated from the rest (sdsweep.results.verdict)."""
    return outcome.verdict.separated if outcome.verdict is not None else None


def _assert_pick_is_robust(results, outcome) -> None:
    """The pick is among the top by ground truth, or the study says its best is not separable.

    Top set: the trials whose truth/concept_accuracy + truth/prior_accuracy is within the TOP_K best values.
    Until the study says whether its best is separated, TOP_K is what the measured picks need (see TOP_K).
    """
    truth = results["truth/concept_accuracy"] + results["truth/prior_accuracy"]
    top = set(results.loc[truth >= truth.nlargest(TOP_K).min(), "trial"])
    assert outcome.best is not None
    best = results.set_index("trial").loc[outcome.best["trial"], [*GRID, *TRUTH]].to_dict()
    print("best", outcome.best["trial"], best, "truth's top", sorted(top), "separated", _separated(outcome))
    assert outcome.best["trial"] in top or _separated(outcome) is False, (outcome.best["trial"], sorted(top))


@pytest.mark.slow
def test_the_chosen_best_is_among_the_top_by_ground_truth(demo_study):
    _assert_pick_is_robust(*demo_study)


@pytest.mark.slow
def test_the_demo_reports_dino_cmmd_and_a_trial_that_learned_beats_the_baseline_in_every_band(demo_study):
    """The good rate at 300 steps beats the untuned model at every noise level, and CMMD falls. Measured on
    build 0: baseline val_loss by band 0.975 / 0.346 / 0.149 / 0.053 / 0.015, after 300 steps 0.120 / 0.034 /
    0.021 / 0.015 / 0.009; CMMD 6.06 -> 4.79 -> 2.59 (100, 300 steps)."""
    results, outcome = demo_study
    assert results[["eval/cmmd", "eval/dino"]].notna().all().all()
    report = (outcome.study_dir / "report.md").read_text()
    assert "eval/cmmd ↓" in report and "eval/dino ↑" in report and "Validation loss by noise level" in report
    baseline = _baseline(outcome.study_dir)
    trained = _rate(results, GOOD_LR).set_index("train.max_train_steps").loc[300]
    bands = [k for k in baseline if k.startswith("eval/val_loss/t")]
    assert len(bands) == 5
    assert all(trained[k] < baseline[k] for k in bands), {k: (baseline[k], trained[k]) for k in bands}
    assert trained["eval/cmmd"] < baseline["eval/cmmd"]


def _spearman(a: pd.Series, b: pd.Series) -> float:
    return float(a.rank().corr(b.rank()))


@pytest.mark.slow
def test_clip_score_agrees_with_ground_truth(demo_study):
    """CLIP score judges "does the image show what the prompt asked": eval/clip_score (the star prompts)
    ranks trials as the judge's concept accuracy does, and eval/prior_clip_score (the seen shapes) as its
    prior accuracy does."""
    results = demo_study[0]
    rho = {
        "clip_score ~ concept": _spearman(results["eval/clip_score"], results["truth/concept_accuracy"]),
        "prior_clip_score ~ prior": _spearman(
            results["eval/prior_clip_score"], results["truth/prior_accuracy"]
        ),
    }
    print("Spearman", {k: round(v, 2) for k, v in rho.items()})
    assert rho["clip_score ~ concept"] >= SPEARMAN_CONCEPT_MIN, rho
    assert rho["prior_clip_score ~ prior"] >= SPEARMAN_PRIOR_MIN, rho


# The "one alternative eval seed set runs in the tests": the demo's grid evaluated on other images of
# the same prompts (eval.seed=4321, not 1234). The too-high rate (3e-2) is left out to keep the time: its row
# is never feasible, so it cannot change the pick.
ALT_EVAL_SEED = 4321


@pytest.fixture(scope="session")
def demo_study_alt_eval(shapes_model, tmp_path_factory):
    outcome, results = _study(
        tmp_path_factory.mktemp("shapes-demo-alt-eval"),
        "+experiment=demo",
        f"eval.seed={ALT_EVAL_SEED}",
        f"sweep.learning_rates=[{LOW_LR},{GOOD_LR},{FAST_LR}]",
        "study=demo-alt-eval",
    )
    print("\n" + results[[*GRID, *TRUTH, "eval/clip_score", "eval/prior_clip_score", "feasible"]].to_string())
    return results, outcome


@pytest.mark.slow
def test_the_demo_holds_on_another_eval_seed_set(demo_study_alt_eval):
    """The same properties as on eval.seed=1234: the untuned model has no star and keeps the seen shapes,
    the fast rate's forgetting is rejected by the drift guard, prior CLIP ranks as prior accuracy, and the
    pick is in the truth's top set (or the study says it cannot separate it)."""
    results, outcome = demo_study_alt_eval
    baseline = _baseline(outcome.study_dir)
    assert baseline["truth/concept_accuracy"] <= BASELINE_CONCEPT_MAX
    assert baseline["truth/prior_accuracy"] >= BASELINE_PRIOR_MIN
    fast_end = _rate(results, FAST_LR).iloc[-1]
    assert fast_end["truth/prior_accuracy"] <= FAST_PRIOR_MAX and not fast_end["feasible"]
    rho = _spearman(results["eval/prior_clip_score"], results["truth/prior_accuracy"])
    assert rho >= SPEARMAN_PRIOR_MIN, rho
    _assert_pick_is_robust(results, outcome)


# One fine-tune per method on the star, each at its own measured rate; the world's prompts (eval=shapes)
# ask for four stars (eval.prompts) and four seen shapes (eval.prior_prompts), so concept and prior accuracy are
# both measured.
METHOD_RUNS = {
    "full": ["method=full", "method.learning_rate=3e-4", "train.max_train_steps=1000"],
    "dreambooth": [
        "method=dreambooth",
        "method.learning_rate=3e-4",
        "train.max_train_steps=1000",
        "method.class_prompt=a red triangle",
        "method.num_class_images=8",
    ],
    "textual_inversion": [
        "method=textual_inversion",
        "method.learning_rate=5e-3",  # scale_lr: x batch 4
        "train.max_train_steps=300",
        'method.placeholder_token="<star>"',
        "method.initializer_token=triangle",
        "method.template=none",
    ],
    "lora": ["method=lora", "method.learning_rate=3e-4", "train.max_train_steps=300"],
}


@pytest.mark.slow
@pytest.mark.parametrize("method", list(METHOD_RUNS))
def test_every_method_learns_the_star_and_keeps_the_prior(method, shapes_model, tmp_path, request):
    run = METHOD_RUNS[method]
    steps = next(o.split("=")[1] for o in run if o.startswith("train.max_train_steps"))
    lr = next(o.split("=")[1] for o in run if o.startswith("method.learning_rate"))
    if method == "full":  # the demo's trial at lr 3e-4 x 1000 is this very run (constant lr, same seed)
        results, outcome = request.getfixturevalue("demo_study")
        results = _rate(results, float(lr))
        results = results[results["train.max_train_steps"] == int(steps)]
    else:
        outcome, results = _study(
            tmp_path,
            "model=shapes",
            "data=shapes",
            "eval=shapes",
            "train.train_batch_size=4",
            *run,
            "+sweep=lr_steps",
            f"sweep.learning_rates=[{lr}]",
            f"sweep.steps=[{steps}]",
            f"study={method}",
        )
    baseline = _baseline(outcome.study_dir)
    row = results.iloc[0]
    print(method, {k: row[k] for k in TRUTH}, "baseline", {k: baseline[k] for k in TRUTH})
    print(method, "val_loss", row["eval/val_loss"], "baseline", baseline["eval/val_loss"])
    assert row["state"] == "COMPLETE"
    # It fits the star: held-out star images are predicted better than by the base model.
    assert row["eval/val_loss"] <= METHOD_VAL_LOSS_RATIO[method] * baseline["eval/val_loss"]
    assert row["truth/prior_accuracy"] >= METHOD_PRIOR_MIN[method]
    # It draws the star (only where measured with a margin: see METHOD_CONCEPT_MIN).
    assert row["truth/concept_accuracy"] >= METHOD_CONCEPT_MIN.get(method, 0.0)


@pytest.mark.slow
def test_demo_methods_fills_every_model_method_cell(shapes_model, tmp_path):
    """`make demo-methods`, shortened to 10 steps: all four methods on the three offline models complete.

    It asserts that every cell runs and is compared with its own baseline, not what 10 steps learn (the
    tiny_sd21 and tiny_sdxl rows are random weights, so their numbers mean nothing); 38 s in-process, one
    thread (world v2, before tiny_sdxl joined).
    """
    from sdsweep.sweep.driver import run_sweep

    outcome = run_sweep(
        [
            "+experiment=demo_methods",
            "tracking=none",
            "sweep.isolation=inprocess",
            "train.max_train_steps=10",
            "eval.num_inference_steps=4",
            f"paths.root={tmp_path}",
        ]
    )
    results = pd.read_csv(outcome.study_dir / "results.csv")
    cells = set(zip(results["model"], results["method"]))
    methods = {"full", "dreambooth", "textual_inversion", "lora"}
    models = ("shapes", "tiny_sd21", "tiny_sdxl")
    assert cells == {(m, x) for m in models for x in methods} and len(results) == 12
    assert (results["state"] == "COMPLETE").all()
    assert results["truth/prior_accuracy"].notna().all()
    # Each model version is compared with its own untuned baseline, and the report has every cell.
    for model in models:
        record = json.loads((outcome.study_dir / "baseline" / model / "metrics.json").read_text())
        assert record["state"] == "COMPLETE" and record["model"] == model
    markdown = (outcome.study_dir / "report.md").read_text()
    comparison = markdown.split("## Comparison by model × method", 1)[1].split("\n## ", 1)[0]
    rows = {
        tuple(cell.strip() for cell in line.strip("|").split("|")[:2]) for line in comparison.splitlines()
    }
    assert {(m, x) for m in models for x in methods} <= rows
    assert "no baseline" not in comparison  # every row has its own model's deltas


# Thresholds hold across builds (SDSWEEP_TEST_SHAPES_SEED) and eval seed sets, measured with `make validate`
# (bench/validate.py: `make demo` per build x eval.seed) on builds 0 and 1 (world v3, 16 star and 16 seen-shape
# images per evaluation); values are "b0 / b0 at eval.seed 4321 / b1", each threshold about two images of 16
# (0.125) outside the worst build unless said otherwise:
# - baseline: concept 0 / 0 / 0, prior 0.94 / 1.0 / 1.0, star CLIP 69.5 / 69.8 / 29.5 (build 1's CLIP scores
#   everything lower), prior CLIP 94 / 93 / 88.
# - lr 1e-5: concept max 0 / 0 / 0, prior min 0.94 / 0.875 / 0.75.
# - lr 3e-4 (100/300/1000): concept 0-0.06 -> 0.375 / 0.4375 / 0.3125; prior at 1000: 0.81 / 0.81 / 0.69.
# - lr 1e-3 at 1000: concept 0.625 / 0.4375 / 0.4375 (>= lr 3e-4's on all three), prior 0.06 / 0.06 / 0.31,
#   infeasible on all three.
# - lr 3e-2: prior 0 everywhere, val_loss >= 1.78x / 2.32x / 1.77x the baseline's, prior CLIP <= 0.23x / 0.26x /
#   0x, never feasible.
# - trials with prior >= 0.85 (all feasible): 4 / 3 / 1.
# - Spearman eval/clip_score ~ concept 0.73 / 0.69 / 0.76, eval/prior_clip_score ~ prior 0.96 / 0.96 / 0.93
#   (without the lr 3e-2 row, as the alternative-eval-seed test runs: 0.69-0.84 and 0.84-0.93).
# - the pick's rank by ground truth (concept + prior; ties share a rank): 1 (trial 5, lr 3e-4 x 1000) / 5
#   (trial 4, lr 3e-4 x 300: trial 5's prior CLIP 66.7 failed the guard at eval.seed 4321) / 1 (trial 0, lr
#   1e-5 x 100: on build 1 only trial 0 passes the guard at 70, which build 0's CLIP scale set).
BASELINE_CONCEPT_MAX = 0.1
BASELINE_PRIOR_MIN = 0.8
LOW_LR, GOOD_LR, FAST_LR, HIGH_LR = 1.0e-5, 3.0e-4, 1.0e-3, 3.0e-2
LOW_PRIOR_MIN = 0.625  # measured 0.75-0.94
# Build 1 at eval.seed 4321 (a partial run) drew 2 stars of 16 at lr 3e-4 x 1000 (0.125; 5 at eval.seed 1234): at
# 16 images this property has no margin left, so the thresholds are that measured minimum (baseline: 0 stars).
GOOD_CONCEPT_GAIN = 0.125  # measured gains 0.125-0.4375
GOOD_CONCEPT_MIN = 0.125  # measured 0.125-0.4375
GOOD_PRIOR_MIN = 0.5  # measured 0.69-0.81
KEPT_PRIOR_MIN = 0.85
FAST_PRIOR_MAX = 0.5  # measured 0.06-0.31, against an untuned 0.94-1.0
HIGH_PRIOR_MAX = 0.1  # measured 0
HIGH_VAL_LOSS_RATIO = 1.4  # measured 1.77-2.32x
HIGH_CLIP_RATIO = 0.5  # prior CLIP, measured 0-0.26x
# Until the study says whether its best is separated (issue 25), the pick must be within the top 5 by ground
# truth: measured ranks 1, 5 and 1. A weak check on purpose: one eval seed set can move the pick to a trial
# that learned nothing, which is the noise the issue is about, not a fault of the build.
TOP_K = 5
SPEARMAN_PRIOR_MIN = 0.7  # measured 0.84-0.96
SPEARMAN_CONCEPT_MIN = 0.4  # measured 0.69-0.84
METHOD_VAL_LOSS_RATIO = {"full": 0.5, "dreambooth": 0.5, "textual_inversion": 0.99, "lora": 0.9}
# Measured (world v3), build 0 / build 1: full (lr 3e-4, 1000 steps; the demo's trial 5) val_loss 0.14x / 0.16x
# baseline, concept 0.375 / 0.3125, prior 0.81 / 0.69; DreamBooth with prior preservation (lr 3e-4, 1000 steps)
# 0.14x / 0.13x, concept 0.125 / 0.3125, prior 0.94 / 1.0; LoRA (lr 3e-4, 300 steps) 0.66x / 0.55x, concept 0 / 0,
# prior 1.0 / 0.56 (the fresh build on another machine: 0.75; by 1000 steps on build 0 its prior collapses
# to 0); textual inversion (lr 5e-3 x batch 4, 300 steps) 0.967x / 0.970x, concept 0 / 0, prior 0.94 / 1.0: an
# embedding cannot teach the UNet a shape it never drew. LoRA's prior is the build-dependent one: its threshold
# asserts "not broken" (2.5 images below the worst build), not "kept".
METHOD_PRIOR_MIN = {"full": 0.5, "dreambooth": 0.8, "textual_inversion": 0.75, "lora": 0.4}
METHOD_CONCEPT_MIN = {"full": 0.1875}  # DreamBooth's 2 stars of 16 leave no margin to assert


def test_preflight_names_a_shapes_clip_that_is_not_built(tmp_path):
    from sdsweep.sweep.preflight import eval_model_problems

    cfg = compose(
        ["eval.clip_model=shapes:sd15@seed5", "eval.metrics=[clip_score]", f"paths.cache={tmp_path}"]
    )
    problems = eval_model_problems(cfg)
    assert len(problems) == 1 and str(shapes.clip_dir(tmp_path, 5)) in problems[0], problems
