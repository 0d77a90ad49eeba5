"""The Evaluator on the real tiny SD-1.5 pipeline, the tiny CLIP and the demo images."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_OVERRIDES, compose
from PIL import Image

from sdsweep import io
from sdsweep.config import features
from sdsweep.errors import ConfigError
from sdsweep.evaluation import metrics
from sdsweep.evaluation.evaluate import Evaluator
from sdsweep.evaluation.generation import generate, sample_plan
from sdsweep.models import loading as models

EVAL_OVERRIDES = TINY_OVERRIDES + ["eval.num_images_per_prompt=2", "eval.num_inference_steps=2"]


def make_cfg(tmp: Path, *extra: str):
    return compose(EVAL_OVERRIDES + [f"paths.root={tmp / 'experiments'}", *extra])


@pytest.fixture(scope="module")
def demo_images(demo_data_dir) -> list[Image.Image]:
    return [Image.open(f).convert("RGB") for f in sorted(Path(demo_data_dir).glob("*.png"))]


@pytest.fixture(scope="module")
def pipeline(tiny_model_dirs):
    return models.load_pipeline(str(tiny_model_dirs["sd15"]))


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval-study")
    return root, io.StudyPaths(root / "study")


@pytest.fixture(scope="module")
def evaluator(study, demo_images) -> Evaluator:
    root, paths = study
    return Evaluator(make_cfg(root), paths, "cpu", demo_images[:4], instance_images=demo_images[4:])


def test_evaluate_is_reproducible_and_writes_samples_and_grid(evaluator, pipeline, tmp_path):
    scheduler_before = pipeline.scheduler
    first = evaluator.evaluate(pipeline, out_dir=tmp_path / "a", label="base")
    second = evaluator.evaluate(pipeline, out_dir=tmp_path / "b")

    assert pipeline.scheduler is scheduler_before  # the DPM-Solver++ swap is undone
    expected = {
        "eval/clip_score",
        "eval/clip_score/p0",
        "eval/clip_score/p1",
        "eval/fd_clip",
        "eval/fd_clip_reliable",
    }
    expected |= {"eval/kd_clip", "eval/clip_i", "eval/appropriate_rate"}
    assert set(first.metrics) == expected
    assert all(np.isfinite(v) for v in first.metrics.values())
    assert first.metrics == second.metrics
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(first.images, second.images))
    # A plain pipeline has no loss: val_loss is missing with the reason, not an error.
    assert "no method" in first.missing["eval/val_loss"]
    assert first.seeds == [1234, 1235, 1234, 1235]
    assert first.prompts == [evaluator.cfg.eval.prompts[0]] * 2 + [evaluator.cfg.eval.prompts[1]] * 2
    assert all(image.size == (32, 32) for image in first.images)
    assert any("FD_CLIP on 4 images is unreliable" in w for w in first.warnings)  # named by what it measures
    assert first.metrics["eval/fd_clip_reliable"] == 0.0

    names = sorted(p.name for p in (tmp_path / "a" / io.TRIAL_SAMPLES).iterdir())
    assert names == [io.sample_name(p, s) for p in (0, 1) for s in (1234, 1235)]
    saved = Image.open(tmp_path / "a" / io.TRIAL_SAMPLES / io.sample_name(1, 1235))
    assert np.array_equal(np.asarray(saved), np.asarray(first.images[3]))
    grid = Image.open(tmp_path / "a" / io.TRIAL_GRID)
    assert grid.size == first.grid.size
    assert grid.width >= 2 * 128 and grid.height >= 2 * 128  # cells upscaled so labels are readable


def test_batching_does_not_change_the_images(evaluator, pipeline):
    ev = evaluator.cfg.eval
    plan = sample_plan(ev.prompts, 2, ev.seed)
    kwargs = dict(
        scheduler=ev.scheduler, num_inference_steps=2, guidance_scale=ev.guidance_scale, resolution=32
    )
    one_by_one = generate(pipeline, plan, batch_size=1, **kwargs)
    all_at_once = generate(pipeline, plan, batch_size=len(plan), **kwargs)
    for a, b in zip(one_by_one.arrays, all_at_once.arrays):
        np.testing.assert_allclose(a, b, atol=1e-4)


def test_a_second_evaluator_reuses_the_cached_reference_features(study, demo_images, evaluator):
    root, paths = study
    first = evaluator.reference_features()
    cached = list((paths.cache / "reference").glob("*.safetensors"))
    assert len(cached) == 1
    again = Evaluator(make_cfg(root), paths, "cpu", demo_images[:4], instance_images=None)
    assert torch.equal(again.reference_features(), first)
    assert again.reference_from_cache is True
    # Different reference images are a different key, never a stale hit.
    other = Evaluator(make_cfg(root), paths, "cpu", demo_images[5:9], instance_images=None)
    assert other.reference_from_cache is None
    other.reference_features()
    assert other.reference_from_cache is False
    assert len(list((paths.cache / "reference").glob("*.safetensors"))) == 2


def test_kid_subset_shrinks_to_the_set_size_with_a_warning(tmp_path, demo_images, pipeline):
    cfg = make_cfg(tmp_path, "eval.kid_subset_size=50", "eval.metrics=[kid]")
    result = Evaluator(cfg, io.StudyPaths(tmp_path / "s"), "cpu", demo_images[:3]).evaluate(pipeline)
    assert set(result.metrics) == {"eval/kd_clip"}
    assert any("KID subset size shrunk from eval.kid_subset_size=50 to 3" in w for w in result.warnings)


def test_a_metric_that_cannot_be_computed_is_missing_not_raised(tmp_path, demo_images, pipeline):
    cfg = make_cfg(tmp_path, "eval.metrics=[fid,clip_i,appropriate_rate]")
    evaluator = Evaluator(cfg, io.StudyPaths(tmp_path / "s"), "cpu", demo_images[:1], instance_images=None)
    result = evaluator.evaluate(pipeline)
    assert "at least 2 reference images" in result.missing["eval/fd_clip"]
    assert "instance" in result.missing["eval/clip_i"]
    assert set(result.metrics) == {"eval/appropriate_rate"}


@pytest.mark.skipif(
    importlib.util.find_spec("torch_fidelity") is not None, reason="torch-fidelity is installed"
)
def test_inception_features_without_torch_fidelity_are_recorded_missing(tmp_path, demo_images, pipeline):
    cfg = make_cfg(tmp_path, "eval.fid_features=inception", "eval.metrics=[fid,kid]")
    result = Evaluator(cfg, io.StudyPaths(tmp_path / "s"), "cpu", demo_images[:4]).evaluate(pipeline)
    assert result.metrics == {}
    assert "torch-fidelity" in result.missing["eval/fid"] and "torch-fidelity" in result.missing["eval/kid"]


def test_auto_features_fall_back_to_clip_and_say_so(tmp_path, demo_images):
    cfg = make_cfg(tmp_path, "eval.fid_features=auto")
    evaluator = Evaluator(cfg, io.StudyPaths(tmp_path / "s"), "cpu", demo_images[:4])
    expected = "inception" if features.torch_fidelity_available() else "clip"
    assert evaluator.feature_kind == expected
    assert any("eval.fid_features=auto" in w for w in evaluator.static_warnings)


def test_nan_images_are_detected_and_count_as_inappropriate(tmp_path, tiny_model_dirs, demo_images):
    broken = models.load_pipeline(str(tiny_model_dirs["sd15"]))
    with torch.no_grad():
        broken.vae.decoder.conv_out.weight.fill_(float("nan"))
    cfg = make_cfg(tmp_path, "eval.metrics=[appropriate_rate,clip_score]")
    result = Evaluator(cfg, io.StudyPaths(tmp_path / "s"), "cpu", demo_images[:4]).evaluate(
        broken, out_dir=tmp_path / "out"
    )
    assert result.metrics["eval/appropriate_rate"] == 0.0
    assert any("4 of 4 generated images contain NaN" in w for w in result.warnings)
    assert (tmp_path / "out" / io.TRIAL_GRID).exists()  # broken images are still saved (as black)


def test_bad_configuration_fails_at_construction_with_the_fix(tmp_path, demo_images):
    paths = io.StudyPaths(tmp_path / "s")
    cfg = make_cfg(tmp_path)
    cfg.eval.prompts = []
    with pytest.raises(ConfigError, match="eval.prompts"):
        Evaluator(cfg, paths, "cpu", demo_images[:4])
    with pytest.raises(ConfigError, match="eval.reference_dir"):
        Evaluator(make_cfg(tmp_path, f"eval.reference_dir={tmp_path / 'nowhere'}"), paths, "cpu", demo_images)
    with pytest.raises(metrics.CLIPUnavailableError, match="could not be loaded offline"):
        Evaluator(make_cfg(tmp_path, f"eval.clip_model={tmp_path / 'no-clip'}"), paths, "cpu", demo_images)


def test_reference_dir_replaces_the_given_reference_images(tmp_path, demo_data_dir, demo_images):
    cfg = make_cfg(tmp_path, f"eval.reference_dir={demo_data_dir}", "eval.metrics=[fid]")
    evaluator = Evaluator(cfg, io.StudyPaths(tmp_path / "s"), "cpu", demo_images[:2])
    assert len(evaluator.reference_images) == len(demo_images)
    assert evaluator.reference_features().shape[0] == len(demo_images)


@pytest.fixture(scope="module")
def full_method(tmp_path_factory):
    from sdsweep.training.methods import get_method

    cfg = make_cfg(tmp_path_factory.mktemp("method"), "method=full")
    components = models.load_components(cfg, torch.device("cpu"))
    method = get_method("full")(cfg, components, torch.device("cpu"))
    method.prepare()
    return cfg, method


@pytest.fixture(scope="module")
def heldout_batch(full_method):
    from sdsweep.config.resolve import resolved_resolution
    from sdsweep.data.examples import load_examples, split_examples
    from sdsweep.data.images import ImageCaptionDataset, collate

    cfg, _ = full_method
    _, heldout = split_examples(load_examples(cfg), cfg.data.num_heldout)
    dataset = ImageCaptionDataset(heldout, resolved_resolution(cfg), center_crop=True, random_flip=False)
    return collate([dataset[i] for i in range(len(dataset))])


def test_val_loss_is_fixed_seed_and_reported_by_evaluate(full_method, heldout_batch, tmp_path, demo_images):
    cfg, method = full_method
    cfg.eval.metrics = ["val_loss", "appropriate_rate"]
    evaluator = Evaluator(cfg, io.StudyPaths(tmp_path / "s"), "cpu", demo_images[:4])
    first = evaluator.val_loss_only(method, heldout_batch)
    assert np.isfinite(first) and first > 0
    assert evaluator.val_loss_only(method, heldout_batch) == first
    result = evaluator.evaluate(method.pipeline_for_eval(cfg.eval.scheduler), method, heldout_batch)
    assert result.metrics["eval/val_loss"] == first
    assert "eval/appropriate_rate" in result.metrics
    # A different seed draws different noise and timesteps, hence a different (but valid) loss.
    cfg.eval.seed += 100
    assert evaluator.val_loss_only(method, heldout_batch) != first


def test_unloadable_safety_checker_is_a_warning_and_degeneracy_still_applies(tmp_path, demo_images, pipeline):
    cfg = make_cfg(
        tmp_path, f"eval.safety_checker={tmp_path / 'no-checker'}", "eval.metrics=[appropriate_rate]"
    )
    result = Evaluator(cfg, io.StudyPaths(tmp_path / "s"), "cpu", demo_images[:4]).evaluate(pipeline)
    assert any("safety checker" in w and "degeneracy check only" in w for w in result.warnings)
    assert 0.0 <= result.metrics["eval/appropriate_rate"] <= 1.0


# ---- prior prompts: drift measured apart from the concept ----------------------------------------------
PRIOR = ["a photo of a red cube", "a photo of a blue ball"]


def test_prior_prompts_are_scored_apart_and_leave_the_concept_metrics_as_they_were(
    evaluator, pipeline, study, demo_images, tmp_path
):
    root, paths = study
    cfg = make_cfg(root, f"eval.prior_prompts=[{','.join(PRIOR)}]")
    with_prior = Evaluator(cfg, paths, "cpu", demo_images[:4], instance_images=demo_images[4:])
    plain = evaluator.evaluate(pipeline)
    result = with_prior.evaluate(pipeline, out_dir=tmp_path / "t")

    concept_prompts = list(cfg.eval.prompts)
    assert result.prompts == [p for p in concept_prompts + PRIOR for _ in (0, 1)]
    assert result.seeds == [1234, 1235] * 4  # the prior images start from the same noise
    # The concept's images and every concept metric are exactly what they are without prior prompts.
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(plain.images, result.images))
    for key, value in plain.metrics.items():
        if key != "eval/appropriate_rate":  # counts every image, the prior's too
            assert result.metrics[key] == value, key
    # The prior's CLIP score is over the prior images with their own prompts, also per prompt.
    model, processor = with_prior.clip_model, with_prior.clip_processor
    prior_images = result.images[4:]
    assert result.metrics["eval/prior_clip_score"] == pytest.approx(
        metrics.clip_score(model, processor, prior_images, result.prompts[4:])
    )
    assert result.metrics["eval/prior_clip_score/p1"] == pytest.approx(
        metrics.clip_score(model, processor, prior_images[2:], [PRIOR[1]] * 2)
    )
    assert not {"eval/clip_score/p2", "eval/prior_clip_score/p2"} & set(result.metrics)
    # Samples and grid rows for both groups; prior prompts have their own prompt indices.
    names = sorted(p.name for p in (tmp_path / "t" / io.TRIAL_SAMPLES).iterdir())
    assert names == [io.sample_name(p, s) for p in range(4) for s in (1234, 1235)]
    assert result.grid.height > plain.grid.height


def test_prior_prompts_validate_before_anything_loads(tmp_path):
    cfg = make_cfg(
        tmp_path,
        "+sweep=lr_steps",
        f"eval.prior_prompts=[{PRIOR[0]}]",
        "sweep.constraints=['eval/prior_clip_score >= 20']",
    )
    assert cfg.sweep.constraints == ["eval/prior_clip_score >= 20"]
    with pytest.raises(ConfigError, match="eval.prior_prompts=.\[a photo of a dog\]"):
        make_cfg(tmp_path, "+sweep=lr_steps", "sweep.constraints=['eval/prior_clip_score >= 20']")
    with pytest.raises(ConfigError, match=r"eval.prior_prompts.*names the concept being taught \(sks\)"):
        make_cfg(tmp_path, "eval.prior_prompts=['a photo of sks, indoors']")
    with pytest.raises(ConfigError, match="is also in eval.prompts"):
        make_cfg(tmp_path, "eval.prior_prompts=['a photo of sks']")
    with pytest.raises(ConfigError, match="non-empty"):
        make_cfg(tmp_path, "eval.prior_prompts=['  ']")


# ---- the held-out-captions protocol ---------------------------------------------------------------------
CAPTIONS = ["a red square", "a blue circle", "a green stripe", "a yellow dot"]


def test_heldout_captions_protocol_pairs_each_caption_with_its_photo(tmp_path, demo_images, pipeline):
    cfg = make_cfg(
        tmp_path,
        "eval.protocol=heldout_captions",
        "eval.metrics=[clip_score,fid,kid,lpips]",
        "eval.lpips_backbone=clip",
    )
    paths = io.StudyPaths(tmp_path / "s")
    evaluator = Evaluator(cfg, paths, "cpu", demo_images[:4], heldout_captions=CAPTIONS)
    result = evaluator.evaluate(pipeline, out_dir=paths.baseline)

    # One image per caption, fixed seeds, and CLIP-feature distances named for what they are.
    assert result.prompts == CAPTIONS and result.seeds == [1234, 1235, 1236, 1237]
    expected = {"eval/clip_score", "eval/fd_clip", "eval/fd_clip_reliable", "eval/kd_clip", "eval/lpips_clip"}
    assert set(result.metrics) == expected
    lpips = result.per_image["eval/lpips_clip"]
    assert len(lpips) == 4 and all(value > 0 for value in lpips)
    assert result.metrics["eval/lpips_clip"] == pytest.approx(float(np.mean(lpips)))
    again = evaluator.evaluate(pipeline, out_dir=paths.trial(0))
    assert again.per_image["eval/lpips_clip"] == lpips  # reproducible

    table = io.read_json(paths.baseline / "heldout.json")["rows"]
    assert [row["caption"] for row in table] == CAPTIONS
    assert [row["eval/lpips_clip"] for row in table] == lpips
    for index, row in enumerate(table):
        assert (paths.baseline / row["sample"]).exists()
        truth = Image.open(paths.root / row["truth"])
        assert np.array_equal(np.asarray(truth), np.asarray(evaluator.reference_images[index]))

    # Prior prompts beside the captions: the paired metrics and the table stay the captions' own.
    prior_cfg = make_cfg(
        tmp_path,
        "eval.protocol=heldout_captions",
        "eval.metrics=[clip_score,fid,kid,lpips]",
        "eval.lpips_backbone=clip",
        f"eval.prior_prompts=[{PRIOR[0]}]",
    )
    prior_paths = io.StudyPaths(tmp_path / "prior")
    with_prior = Evaluator(prior_cfg, prior_paths, "cpu", demo_images[:4], heldout_captions=CAPTIONS)
    mixed = with_prior.evaluate(pipeline, out_dir=prior_paths.baseline)
    assert mixed.prompts == CAPTIONS + [PRIOR[0]] * 2
    assert mixed.per_image["eval/lpips_clip"] == lpips
    assert {k: mixed.metrics[k] for k in expected} == result.metrics
    assert {"eval/prior_clip_score", "eval/prior_clip_score/p0"} <= set(mixed.metrics)
    rows = io.read_json(prior_paths.baseline / "heldout.json")["rows"]
    assert [row["caption"] for row in rows] == CAPTIONS

    # The report's test-set table: caption, ground truth, baseline, best trial, LPIPS per row.
    from sdsweep.results.protocols import heldout_section

    section = heldout_section(paths.root, best_trial=0)
    assert all(caption in section.markdown for caption in CAPTIONS)
    assert "eval/lpips_clip baseline" in section.markdown and "](trials/0000/samples/" in section.markdown
    assert section.html.count("data:image/png;base64") == 3 * len(CAPTIONS)


def test_real_lpips_without_torchvision_is_missing_with_the_reason(tmp_path, demo_images, pipeline):
    if features.torchvision_available():
        pytest.skip("torchvision is installed")
    cfg = make_cfg(
        tmp_path, "eval.protocol=heldout_captions", "eval.metrics=[lpips]", "eval.lpips_backbone=alex"
    )
    evaluator = Evaluator(
        cfg, io.StudyPaths(tmp_path / "s"), "cpu", demo_images[:4], heldout_captions=CAPTIONS
    )
    result = evaluator.evaluate(pipeline)
    assert result.metrics == {}
    assert (
        "torchvision" in result.missing["eval/lpips"]
        and "lpips_backbone=clip" in result.missing["eval/lpips"]
    )


def test_heldout_protocol_needs_one_caption_per_photo(tmp_path, demo_images):
    cfg = make_cfg(tmp_path, "eval.protocol=heldout_captions", "eval.metrics=[clip_score]")
    with pytest.raises(ConfigError, match="one non-empty caption per held-out photo"):
        Evaluator(cfg, io.StudyPaths(tmp_path / "s"), "cpu", demo_images[:4], heldout_captions=CAPTIONS[:2])


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["+sweep=lr_steps", "sweep.objectives=[{metric: eval/fid, direction: minimize}]"], "eval/fd_clip"),
        (["+sweep=lr_steps", "sweep.constraints=['eval/kid <= 1']"], "Inception features"),
        (["+sweep=lr_steps", "sweep.constraints=['eval/lpips_clip <= 1']"], "heldout_captions"),
        (["eval.metrics=[lpips]"], "eval.protocol=heldout_captions"),
        (["eval.protocol=heldout_captions", "eval.reference_dir=/tmp"], "eval.reference_dir"),
    ],
)
def test_metrics_the_study_cannot_compute_are_config_errors(tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=message):
        make_cfg(tmp_path, *overrides)


def test_objectives_on_computable_metrics_validate(tmp_path):
    cfg = make_cfg(
        tmp_path,
        "+sweep=lr_steps",
        "eval.protocol=heldout_captions",
        "eval.metrics=[lpips,fid]",
        "eval.lpips_backbone=clip",
        "sweep.objectives=[{metric: eval/lpips_clip, direction: minimize}]",
        "sweep.constraints=['eval/fd_clip <= 1000']",
    )
    assert cfg.sweep.objectives[0].metric == "eval/lpips_clip"


@pytest.mark.slow
def test_heldout_protocol_through_a_real_sweep_scores_baseline_and_trial(tmp_path):
    from sdsweep.results.protocols import heldout_section
    from sdsweep.sweep.driver import run_sweep

    outcome = run_sweep(
        TINY_OVERRIDES
        + [
            "+sweep=lr_steps",
            "sweep.learning_rates=[1e-3]",
            "sweep.steps=[2]",
            "sweep.isolation=inprocess",
            "data.num_heldout=3",
            "eval.protocol=heldout_captions",
            "eval.metrics=[clip_score,fid,lpips,appropriate_rate]",
            "eval.lpips_backbone=clip",
            f"paths.root={tmp_path}",
        ]
    )
    paths = io.StudyPaths(outcome.study_dir)
    for folder in (paths.baseline, paths.trial(0)):
        record = io.read_json(folder / io.TRIAL_METRICS)
        assert {"eval/clip_score", "eval/fd_clip", "eval/lpips_clip"} <= set(record["metrics"]), record
        assert len(io.read_json(folder / "heldout.json")["rows"]) == 3
    assert "eval/lpips_clip best" in heldout_section(paths.root, 0).markdown
    assert "Held-out captions" in paths.report_md.read_text()
