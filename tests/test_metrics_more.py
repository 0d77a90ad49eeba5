"""CMMD, DINO and validation loss by noise level (#28), on synthetic features, the shapes world and the tiny model."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from conftest import TINY_OVERRIDES, compose
from PIL import Image

from sdsweep import io
from sdsweep.cli import UserError, preflight
from sdsweep.errors import ConfigError
from sdsweep.evaluation import dino
from sdsweep.evaluation.cmmd import cmmd, cmmd_interval
from sdsweep.evaluation.evaluate import Evaluator
from sdsweep.metric_names import direction_arrow
from sdsweep.models import loading as models
from sdsweep.models import shapes


# ---- CMMD -------------------------------------------------------------------------------------------------
def _direct_cmmd(x: np.ndarray, y: np.ndarray, sigma: float = 10.0) -> float:
    """The textbook unbiased MMD^2, pair by pair, on unit-length rows, times 1000."""
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    y = y / np.linalg.norm(y, axis=1, keepdims=True)

    def k(a, b):
        return math.exp(-float(((a - b) ** 2).sum()) / (2 * sigma**2))

    m, n = len(x), len(y)
    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    xy = sum(k(a, b) for a in x for b in y) / (m * n)
    return 1000 * (xx + yy - 2 * xy)


def test_cmmd_matches_a_closed_form_and_a_direct_computation():
    p, q = np.eye(4)[0], np.eye(4)[1]  # orthogonal unit vectors: |p - q|^2 = 2
    value = cmmd(np.stack([p, p]), np.stack([q, q]))
    assert value == pytest.approx(2000 * (1 - math.exp(-2 / 200)), rel=1e-9)  # 19.90...
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(7, 16)), rng.normal(0.3, 1.0, size=(9, 16))
    assert cmmd(x, y) == pytest.approx(_direct_cmmd(x, y), rel=1e-9)


def test_cmmd_is_unbiased_near_zero_for_two_samples_of_one_distribution():
    rng = np.random.default_rng(1)
    same = [cmmd(rng.normal(size=(10, 32)), rng.normal(size=(10, 32))) for _ in range(200)]
    shifted = [cmmd(rng.normal(size=(10, 32)), rng.normal(0.5, 1.0, size=(10, 32))) for _ in range(20)]
    mean, se = float(np.mean(same)), float(np.std(same, ddof=1) / np.sqrt(len(same)))
    assert abs(mean) < 3 * se  # unbiased: centred on 0 (values below 0 happen, as they should)
    assert min(same) < 0
    # The biased (V-statistic) estimate would sit ~1000 * (1 - k) / n above 0 per set: far outside.
    assert mean < 0.2 * np.mean(shifted)
    assert min(shifted) > 3 * se


def test_cmmd_interval_is_a_seeded_bootstrap_over_the_generated_images():
    rng = np.random.default_rng(2)
    x, y = rng.normal(size=(8, 16)), rng.normal(0.4, 1.0, size=(8, 16))
    strata = [0, 0, 0, 0, 1, 1, 1, 1]
    interval = cmmd_interval(x, y, strata, seed=3)
    assert interval.value == pytest.approx(cmmd(x, y))
    assert interval.method == "bootstrap" and interval.n == 8
    assert interval.lo < interval.value < interval.hi and interval.se > 0
    assert cmmd_interval(x, y, strata, seed=3) == interval
    from sdsweep.evaluation.metrics import MetricUnavailable

    with pytest.raises(MetricUnavailable, match="at least 2 images per set"):
        cmmd(x[:1], y)


# ---- DINO -------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_dino(tmp_path_factory):
    from sdsweep.models import tiny

    folder = tmp_path_factory.mktemp("dino") / "vit"
    model, processor = tiny.build_tiny_dino(seed=0)  # a small random ViT, saved as a user's folder would be
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def _scenes(shape: str, colour: str, count: int, seed: int) -> list[Image.Image]:
    return [shapes.draw(replace(s, colour=colour)) for s in shapes.scenes(count, seed, (shape,))]


def test_dino_scores_the_instance_above_other_shapes_in_the_shapes_world(tiny_dino):
    model, processor = dino.load_dino(str(tiny_dino))
    instance = _scenes("star", "red", 4, seed=0)
    same = np.mean(dino.dino_per_image(model, processor, _scenes("star", "red", 6, seed=1), instance))
    for shape, colour in [("star", "blue"), ("circle", "red"), ("square", "green"), ("triangle", "yellow")]:
        other = dino.dino_per_image(model, processor, _scenes(shape, colour, 6, seed=1), instance)
        assert same > np.mean(other), (shape, colour)
    assert dino.dino_per_image(model, processor, instance[:1], instance[:1]) == [pytest.approx(1.0)]


def test_a_dino_model_that_is_not_there_is_named(tmp_path, tiny_dino):
    with pytest.raises(dino.DINOUnavailableError, match="eval.dino_model"):
        dino.load_dino(str(tmp_path / "nothing"))
    base = TINY_OVERRIDES + [f"paths.root={tmp_path / 'exp'}", "eval.metrics=[dino]"]
    with pytest.raises(UserError, match=r"DINO model 'facebook/dino-vits16' is not in the local"):
        preflight(base + ["eval.dino_model=facebook/dino-vits16"])
    with pytest.raises(UserError, match="DINO model folder .* has no config.json"):
        preflight(base + [f"eval.dino_model={tmp_path}"])
    preflight(base + [f"eval.dino_model={tiny_dino}"])
    unwanted = [f"paths.root={tmp_path / 'other'}", "eval.dino_model=facebook/dino-vits16"]
    preflight(TINY_OVERRIDES + unwanted)  # not in eval.metrics: not checked


def test_new_metrics_have_directions_and_are_known_to_the_config(tmp_path):
    assert direction_arrow("eval/dino") == "↑" and direction_arrow("eval/cmmd") == "↓"
    with pytest.raises(ConfigError, match="unknown metric"):
        compose(TINY_OVERRIDES + ["eval.metrics=[dinov9]"])
    with pytest.raises(ConfigError, match="cannot compute it"):
        compose(
            TINY_OVERRIDES + ["+sweep=tpe", "sweep.objectives=[{metric: eval/cmmd, direction: minimize}]"]
        )


def test_the_evaluator_gives_dino_and_cmmd_with_intervals_on_the_tiny_model(
    tmp_path, tiny_model_dirs, demo_data_dir
):
    images = [Image.open(f).convert("RGB") for f in sorted(Path(demo_data_dir).glob("*.png"))]
    cfg = compose(
        TINY_OVERRIDES
        + [
            f"paths.root={tmp_path / 'exp'}",
            "eval.num_images_per_prompt=2",
            "eval.metrics=[cmmd,dino,fid]",
            "eval.dino_model=tiny",
        ]
    )
    pipeline = models.load_pipeline(str(tiny_model_dirs["sd15"]))
    evaluator = Evaluator(cfg, io.StudyPaths(tmp_path / "s"), "cpu", images[:4], instance_images=images[4:])
    result = evaluator.evaluate(pipeline, out_dir=tmp_path / "out")
    assert {"eval/cmmd", "eval/dino", "eval/fd_clip"} <= set(result.metrics), result.missing
    assert result.intervals["eval/cmmd"].method == "bootstrap"
    assert result.intervals["eval/cmmd"].lo <= result.metrics["eval/cmmd"] <= result.intervals["eval/cmmd"].hi
    assert result.intervals["eval/dino"].method == "bootstrap"
    assert result.intervals["eval/fd_clip"].method == "none"  # FD keeps its stated reason
    units = result.units
    assert units["dino"].notna().all() and np.mean(units["dino"]) == pytest.approx(
        result.metrics["eval/dino"]
    )
    # Too few reference images: CMMD is absent with the reason, never zero.
    few = Evaluator(cfg, io.StudyPaths(tmp_path / "t"), "cpu", images[:1], instance_images=None)
    result = few.evaluate(pipeline)
    assert "eval/cmmd" not in result.metrics and "at least 2" in result.missing["eval/cmmd"]
    assert "instance" in result.missing["eval/dino"]


# ---- validation loss by noise level -------------------------------------------------------------------------
def test_band_edges_split_the_schedule_and_timesteps_stay_in_their_band():
    import torch

    from sdsweep.evaluation.validation import band_edges, band_key
    from sdsweep.training.loss import sample_noise_and_timesteps, timestep_band

    assert band_edges(1000, 5) == [(0, 199), (200, 399), (400, 599), (600, 799), (800, 999)]
    assert band_key(0, 199) == "eval/val_loss/t0-199" and band_edges(1000, 0) == []
    assert direction_arrow("eval/val_loss/t0-199") == "↓"
    latents = torch.zeros(64, 4, 2, 2)
    with timestep_band(200, 399):
        _, steps = sample_noise_and_timesteps(latents, 1000, torch.Generator().manual_seed(0))
    assert steps.min() >= 200 and steps.max() <= 399 and len(set(steps.tolist())) > 10
    _, steps = sample_noise_and_timesteps(latents, 1000, torch.Generator().manual_seed(0))
    assert steps.max() > 399  # outside the block the whole range is drawn again


@pytest.mark.parametrize("model", ["tiny", "tiny_sd21"])  # epsilon and v-prediction
def test_training_in_one_band_lowers_that_bands_validation_loss_most(tmp_path, demo_data_dir, model):
    import json

    import torch

    from sdsweep.evaluation.validation import validation_loss, validation_loss_by_band
    from sdsweep.models.loading import load_components
    from sdsweep.training.loss import timestep_band
    from sdsweep.training.methods import get_method

    cfg = compose(TINY_OVERRIDES + [f"model={model}", "method=full"])
    torch.manual_seed(0)
    cpu = torch.device("cpu")
    method = get_method("full")(cfg, load_components(cfg, cpu), cpu, cache_dir=tmp_path)
    method.prepare()
    rows = [json.loads(line) for line in (demo_data_dir / "metadata.jsonl").read_text().splitlines()][:4]
    pixels = [
        np.asarray(Image.open(demo_data_dir / r["file_name"]).convert("RGB").resize((32, 32))) for r in rows
    ]
    batch = {
        "pixel_values": torch.from_numpy(np.stack(pixels) / 127.5 - 1.0).permute(0, 3, 1, 2).float(),
        "captions": [r["text"] for r in rows],
    }
    before = validation_loss_by_band(method, batch, seed=5, timesteps=3, bands=5)
    assert list(before) == [f"eval/val_loss/t{lo}-{lo + 199}" for lo in range(0, 1000, 200)]
    assert before == validation_loss_by_band(method, batch, seed=5, timesteps=3, bands=5)  # fixed draws
    assert validation_loss(method, batch, 5, 3) not in before.values()  # the whole range is another number
    optimizer = torch.optim.AdamW(method.trainable_parameters(), lr=1e-3)
    method.set_train_mode(True)
    for step in range(8):  # learn the noisy end only: t in [800, 999]
        with timestep_band(800, 999):
            loss, _ = method.compute_loss(batch, torch.Generator().manual_seed(100 + step))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    method.set_train_mode(False)
    after = validation_loss_by_band(method, batch, seed=5, timesteps=3, bands=5)
    gain = {key: before[key] - after[key] for key in before}
    assert gain["eval/val_loss/t800-999"] > 0, (before, after)
    assert max(gain, key=lambda k: gain[k] / before[k]) == "eval/val_loss/t800-999", (before, after)


def test_the_report_draws_validation_loss_by_band_for_baseline_best_and_a_chosen_trial(
    finished_study, tmp_path
):
    from sdsweep.results.band_figure import band_values, val_loss_band_plot
    from sdsweep.results.report import build_report
    from sdsweep.results.study_folder import load_study

    data = load_study(finished_study)
    assert list(band_values(data.baseline.metrics)) == [(lo, lo + 199) for lo in range(0, 1000, 200)]
    assert all(len(band_values(r.metrics)) == 5 for r in data.records.values())
    html, md = build_report(finished_study, tmp_path / "report")
    assert (tmp_path / "report" / "report_files" / "val_loss_bands.png").stat().st_size > 0
    assert "Validation loss by noise level" in md.read_text()
    chosen = max(data.records)
    assert val_loss_band_plot(data, tmp_path / "chosen.png", trial=chosen) == tmp_path / "chosen.png"
