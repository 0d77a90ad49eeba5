"""The known-answer shapes world: the judge is exact on the world, and the pretrained model behaves as built.

The slow tests build the shapes model once per session (minutes on a CPU) and run the demo study on it;
their thresholds come from measured numbers (see the comments) with a margin.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from sdsweep import judge, shapes
from tests.conftest import compose


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
    star = shapes.Scene("star", "red", "left", 15, 0, 0)
    circle = shapes.Scene("circle", "blue", "right", 15, 0, 0)
    images = [shapes.draw(star), shapes.draw(star), shapes.draw(circle), shapes.draw(circle)]
    prompts = ["a red star on the left", "a red <star> on the left", "a blue circle", "a green circle"]
    assert judge.judge_prompts(images, prompts) == {
        "truth/concept_accuracy": 1.0,
        "truth/prior_accuracy": 0.5,  # the green circle came out blue
    }
    # A prompt outside the world has no ground truth, and an empty group is left out, not reported as 0.
    assert judge.judge_prompts([images[0]], ["a photo of sks"]) == {}
    with pytest.raises(ValueError, match="eval.judge='cubes'"):
        judge.judge_truth("cubes", images, prompts)


def test_tokenizer_has_the_star_and_a_one_token_initializer():
    tokenizer = shapes.build_tokenizer()
    # "star" is a word of the vocabulary (the UNet's text encoder knows it from CLIP), and "triangle" is one
    # token, as textual inversion's initializer must be. Other words may be two or three BPE pieces.
    assert tokenizer.tokenize("star") == ["star</w>"] and tokenizer.tokenize("triangle") == ["triangle</w>"]
    for word in (*shapes.SHAPES, *shapes.COLOURS, *shapes.POSITIONS):
        assert tokenizer.unk_token not in tokenizer.tokenize(word), word


def test_concept_dataset_holds_only_captioned_stars(tmp_path):
    folder = shapes.write_concept_dataset(tmp_path / "stars", num_images=6)
    rows = [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines()]
    assert len(rows) == 6 and all(" star " in row["text"] for row in rows)
    for row in rows:
        verdict = judge.judge_image(Image.open(folder / row["file_name"]))
        assert verdict.shape == "star" and verdict.colour in row["text"]


def test_demo_recipes_compose_on_the_shapes_world():
    cfg = compose(["+experiment=demo"])
    assert cfg.model.pretrained == "shapes:sd15" and cfg.eval.judge == "shapes"
    assert cfg.data.path.endswith("shapes/data-v1") and not cfg.data.random_flip
    assert cfg.eval.clip_model.endswith("shapes/sd15-v1/clip")
    methods = compose(["+experiment=demo_methods"])
    assert list(methods.sweep.params["model"].choices) == ["shapes", "tiny_sd21"]
    assert len(methods.sweep.params["method"].choices) == 4


# ---- on the pretrained model (slow: the build takes minutes once per session) -------------------------------
@pytest.fixture(scope="session")
def shapes_model():
    return shapes.ensure_shapes_model()


@pytest.fixture(scope="session")
def demo_study(shapes_model, tmp_path_factory):
    """The `make demo` study (3 learning rates x 3 step counts, one run per rate), run in-process."""
    from sdsweep.sweep import run_sweep

    root = tmp_path_factory.mktemp("shapes-demo")
    outcome = run_sweep(
        ["+experiment=demo", "tracking=none", "sweep.isolation=inprocess", f"paths.root={root}"]
    )
    assert outcome.finished
    return pd.read_csv(outcome.study_dir / "results.csv"), outcome.study_dir


def _baseline(study_dir) -> dict:
    found = sorted(study_dir.rglob("baseline*/metrics.json")) or sorted(study_dir.rglob("*baseline*.json"))
    assert found, f"no baseline metrics under {study_dir}"
    data = json.loads(found[0].read_text())
    return data.get("metrics", data)


@pytest.mark.slow
def test_baseline_knows_the_prior_but_not_the_star(demo_study):
    baseline = _baseline(demo_study[1])
    assert baseline["truth/concept_accuracy"] <= BASELINE_CONCEPT_MAX
    assert baseline["truth/prior_accuracy"] >= BASELINE_PRIOR_MIN


@pytest.mark.slow
def test_a_good_lr_learns_the_star_as_steps_grow(demo_study):
    results = demo_study[0]
    good = results[np.isclose(results["method.learning_rate"], GOOD_LR)].sort_values("train.max_train_steps")
    concept = good["truth/concept_accuracy"].tolist()
    assert concept[-1] > concept[0] and concept[-1] >= GOOD_CONCEPT_MIN, concept


@pytest.mark.slow
def test_too_high_an_lr_breaks_the_prior_and_is_flagged(demo_study):
    results = demo_study[0]
    high = results[np.isclose(results["method.learning_rate"], HIGH_LR)]
    good = results[np.isclose(results["method.learning_rate"], GOOD_LR)]
    assert high["truth/prior_accuracy"].max() <= HIGH_PRIOR_MAX
    assert high["truth/prior_accuracy"].mean() < good["truth/prior_accuracy"].mean()


@pytest.mark.slow
def test_clip_score_agrees_with_ground_truth(demo_study):
    results = demo_study[0]
    rho = results["eval/clip_score"].rank().corr(results["truth/concept_accuracy"].rank())
    assert math.isfinite(rho) and rho >= SPEARMAN_MIN, rho


# Measured on the default build (see the report in the branch history); thresholds keep a margin.
BASELINE_CONCEPT_MAX = 0.25
BASELINE_PRIOR_MIN = 0.5
GOOD_LR = 1.0e-3
GOOD_CONCEPT_MIN = 0.5
HIGH_LR = 3.0e-2
HIGH_PRIOR_MAX = 0.5
SPEARMAN_MIN = 0.2
