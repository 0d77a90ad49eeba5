"""Metric functions on real images (the demo set) and the real tiny CLIP: no pipelines involved."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageEnhance

from sdsweep import metric_names
from sdsweep.evaluation import metrics

RESOLUTION = 32


@pytest.fixture(scope="module")
def demo_images(demo_data_dir) -> list[Image.Image]:
    files = sorted(Path(demo_data_dir).glob("*.png"))
    return [metrics.square_resize(Image.open(f), RESOLUTION) for f in files]


@pytest.fixture(scope="module")
def demo_captions(demo_data_dir) -> list[str]:
    import json

    rows = [json.loads(line) for line in (Path(demo_data_dir) / "metadata.jsonl").read_text().splitlines()]
    return [row["text"] for row in sorted(rows, key=lambda r: r["file_name"])]


@pytest.fixture(scope="module")
def clip(tiny_clip_dir):
    return metrics.load_clip(str(tiny_clip_dir))


@pytest.fixture(scope="module")
def clip_features(clip) -> metrics.CLIPImageFeatures:
    return metrics.CLIPImageFeatures(*clip, name="tiny")


def brightened(images: list[Image.Image], factor: float) -> list[Image.Image]:
    return [ImageEnhance.Brightness(image).enhance(factor) for image in images]


class ChannelStats(torch.nn.Module):
    """A hand-made feature extractor (per-channel mean and std) showing FID/KID accept any module."""

    num_features = 6
    feature_id = "channel-stats"

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        pixels = images.float().flatten(2) / 255.0
        return torch.cat([pixels.mean(-1), pixels.std(-1)], dim=1)


def test_clip_score_equals_torchmetrics_functional(clip, demo_images, demo_captions):
    from torchmetrics.functional.multimodal import clip_score as functional_clip_score

    model, processor = clip
    ours = metrics.clip_score(model, processor, demo_images, demo_captions)
    reference = functional_clip_score(
        list(metrics.images_to_uint8(demo_images)),
        demo_captions,
        model_name_or_path=lambda: (model, processor),
    )
    assert ours > 0  # a zero would make the comparison vacuous (torchmetrics floors at 0)
    assert ours == pytest.approx(float(reference), rel=1e-5)


def test_clip_score_needs_one_prompt_per_image(clip, demo_images):
    with pytest.raises(ValueError, match="one prompt per image"):
        metrics.clip_score(*clip, demo_images[:2], ["a photo of sks"])


def test_fid_of_a_set_against_itself_is_zero_and_grows_with_a_shift(clip_features, demo_images):
    real = metrics.extract_features(clip_features, demo_images)
    assert real.shape == (len(demo_images), clip_features.num_features)
    same = metrics.frechet_distance(real, real)
    slightly = metrics.frechet_distance(
        real, metrics.extract_features(clip_features, brightened(demo_images, 1.3))
    )
    strongly = metrics.frechet_distance(
        real, metrics.extract_features(clip_features, brightened(demo_images, 2.0))
    )
    assert same == pytest.approx(0.0, abs=1e-4)
    assert 0 < slightly < strongly


def test_fid_and_kid_accept_an_injected_feature_module(demo_images):
    extractor = ChannelStats()
    real = metrics.extract_features(extractor, demo_images, batch_size=3)
    fake = metrics.extract_features(extractor, brightened(demo_images, 1.8), batch_size=4)
    assert real.shape == (len(demo_images), 6)
    assert metrics.frechet_distance(real, fake) > metrics.frechet_distance(real, real) + 1e-3
    kid_same, _ = metrics.kernel_inception_distance(real, real, subset_size=len(real))
    kid_shift, _ = metrics.kernel_inception_distance(real, fake, subset_size=len(real))
    assert kid_shift > kid_same


def test_kid_is_reproducible_and_leaves_the_global_rng_alone(clip_features, demo_images):
    real = metrics.extract_features(clip_features, demo_images[:6])
    fake = metrics.extract_features(clip_features, brightened(demo_images[:6], 1.5))
    torch.manual_seed(7)
    expected_next = torch.rand(1)
    torch.manual_seed(7)
    first = metrics.kernel_inception_distance(real, fake, subset_size=3, seed=5)
    assert torch.equal(torch.rand(1), expected_next)
    assert metrics.kernel_inception_distance(real, fake, subset_size=3, seed=5) == first


def test_kid_rejects_impossible_subset_sizes(clip_features, demo_images):
    real = metrics.extract_features(clip_features, demo_images[:3])
    with pytest.raises(metrics.MetricUnavailable, match="subset size"):
        metrics.kernel_inception_distance(real, real, subset_size=1)
    with pytest.raises(metrics.MetricUnavailable, match="subset size"):
        metrics.kernel_inception_distance(real, real, subset_size=4)


def test_clip_i_is_one_for_the_instance_itself_and_lower_for_other_images(clip, demo_images):
    model, processor = clip
    assert metrics.clip_i(model, processor, demo_images[:1], demo_images[:1]) == pytest.approx(1.0, abs=1e-5)
    others = metrics.clip_i(model, processor, brightened(demo_images[1:], 2.5), demo_images[:1])
    assert others < 1.0 - 1e-4


def test_appropriate_rate_zero_for_degenerate_images_and_one_for_real_ones(demo_images):
    size = (RESOLUTION, RESOLUTION, 3)
    black = np.zeros(size, dtype=np.float32)
    grey = np.full(size, 0.5, dtype=np.float32)
    nan = np.full(size, np.nan, dtype=np.float32)
    assert metrics.degenerate_reason(black) == "black"
    assert metrics.degenerate_reason(grey) == "constant"
    assert metrics.degenerate_reason(nan) == "nan"
    assert metrics.appropriate_rate([black, black]) == 0.0
    assert metrics.appropriate_rate([nan, grey]) == 0.0
    real = [metrics.pil_to_float(image) for image in demo_images]
    assert metrics.appropriate_rate(real) == 1.0
    assert metrics.appropriate_rate(real[:3] + [black]) == pytest.approx(0.75)
    assert metrics.appropriate_rate(real[:2], unsafe=[True, False]) == pytest.approx(0.5)


def test_unloadable_clip_model_names_the_fix(tmp_path):
    with pytest.raises(metrics.CLIPUnavailableError, match="could not be loaded offline.*eval.clip_model"):
        metrics.load_clip(str(tmp_path / "no-such-clip"))


def test_images_of_different_sizes_are_rejected_with_the_fix(demo_images):
    with pytest.raises(ValueError, match="square_resize"):
        metrics.images_to_uint8([demo_images[0], demo_images[1].resize((16, 16))])


def test_lpips_structure_on_clip_features_is_zero_for_a_pair_and_grows_with_distortion(
    clip_features, demo_images
):
    model, processor = clip_features.model, clip_features.processor
    feature = metrics.CLIPVisionLPIPSFeatures(model, processor)
    images = [metrics.square_resize(image, 32) for image in demo_images[:3]]
    clean = metrics.pil_to_signed(images)
    assert clean.min() >= -1.0 and clean.max() <= 1.0
    generator = torch.Generator().manual_seed(0)
    noise = torch.randn(clean.shape, generator=generator)
    small = (clean + 0.1 * noise).clamp(-1, 1)
    large = (clean + 0.6 * noise).clamp(-1, 1)

    same = metrics.lpips_structured(feature, clean, clean)
    assert same.shape == (3,) and torch.allclose(same, torch.zeros(3), atol=1e-6)
    assert (
        metrics.lpips_structured(feature, clean, large) > metrics.lpips_structured(feature, clean, small)
    ).all()
    assert (
        metric_names.lpips_key("clip") == "eval/lpips_clip" and metric_names.lpips_key("alex") == "eval/lpips"
    )


def test_clip_score_of_a_used_and_saved_tokenizer_emits_no_max_length_warning(
    tmp_path, tiny_clip_dir, demo_images
):
    """#32.5: the shapes CLIP's tokenizer is saved after the build used it (sdsweep.models.tokens: padding to
    max_length with truncation), so its tokenizer.json keeps max_length=77; torchmetrics then called it with
    padding=True and transformers warned "`max_length` is ignored ..." on every evaluation in every worker log."""
    import shutil
    import warnings

    from transformers import CLIPTokenizer

    from sdsweep.models.tokens import tokenize_prompts

    folder = tmp_path / "clip"
    shutil.copytree(tiny_clip_dir, folder)
    tokenizer = CLIPTokenizer.from_pretrained(folder)
    tokenize_prompts(
        tokenizer, ["a red star"]
    )  # as the build does, before it saves the tokenizer with the CLIP
    tokenizer.save_pretrained(folder)
    model, processor = metrics.load_clip(str(folder))
    assert processor.tokenizer.init_kwargs.get("max_length") == 77  # the state that made the warning
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        score = metrics.clip_score(model, processor, demo_images[:2], ["a red star", "a blue circle " * 60])
    assert score >= 0
    assert not [w for w in caught if "max_length" in str(w.message) or "longer than" in str(w.message)]
