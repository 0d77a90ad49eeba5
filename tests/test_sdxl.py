"""SDXL as a model version: the tiny SDXL (two text encoders, pooled embedding, time_ids) built offline,
trained through the same loss and loop as SD, evaluated and saved through StableDiffusionXLPipeline."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import TINY_OVERRIDES, compose
from PIL import Image

CPU = torch.device("cpu")
SDXL_OVERRIDES = [o for o in TINY_OVERRIDES if not o.startswith("model=")] + ["model=tiny_sdxl"]


def sdxl_config(tmp_path: Path, *extra: str):
    return compose(SDXL_OVERRIDES + [f"paths.root={tmp_path}", *extra])


@pytest.fixture(scope="module")
def components(tmp_path_factory):
    from sdsweep.models.loading import load_components

    return load_components(sdxl_config(tmp_path_factory.mktemp("sdxl")), CPU)


@pytest.fixture(scope="module")
def full_method(components, tmp_path_factory):
    from sdsweep.training.methods import get_method

    cfg = sdxl_config(tmp_path_factory.mktemp("sdxl-full"), "method=full")
    method = get_method("full")(cfg, components, CPU)
    method.prepare()
    return method


def test_tiny_sdxl_is_a_saved_sdxl_pipeline_described_as_sdxl(components):
    from diffusers import StableDiffusionXLPipeline

    from sdsweep.models import tiny
    from sdsweep.models.versions import SDXL, version_of_folder

    folder = tiny.ensure_tiny_model("sdxl")
    assert json.loads((folder / "model_index.json").read_text())["_class_name"] == "StableDiffusionXLPipeline"
    assert version_of_folder(folder) is SDXL and components.version is SDXL
    assert components.text_encoder_2 is not None and components.tokenizer_2 is not None
    assert components.unet.config.addition_embed_type == "text_time"
    assert components.prediction_type == "epsilon"
    pipe = StableDiffusionXLPipeline.from_pretrained(folder)  # loads with diffusers' own class
    assert type(pipe.text_encoder_2).__name__ == "CLIPTextModelWithProjection"


def test_prompt_embeddings_match_the_sdxl_pipeline(components, full_method):
    """Both encoders' penultimate states, concatenated, and the pooled embedding, as diffusers encodes them."""
    from sdsweep.models.loading import build_pipeline

    prompts = ["a photo of sks dog", "red circle"]
    text = full_method.encode_prompts(prompts)
    assert text.hidden_states.shape == (2, 77, 64) and text.pooled.shape == (2, 32)
    pipe = build_pipeline(components, device=CPU)
    with torch.no_grad():
        expected, _, pooled, _ = pipe.encode_prompt(prompts, device=CPU, do_classifier_free_guidance=False)
    torch.testing.assert_close(text.hidden_states, expected)
    torch.testing.assert_close(text.pooled, pooled)


def test_time_ids_record_original_size_crop_and_target(tmp_path, components, full_method):
    """A 96x64 (w x h) image resized to 48x32 and centre-cropped to 32 px: original (64, 96), crop (0, 8)."""
    from sdsweep.data.examples import Example
    from sdsweep.data.images import ImageCaptionDataset, collate
    from sdsweep.models.loading import build_pipeline

    Image.new("RGB", (96, 64), (200, 30, 30)).save(tmp_path / "wide.png")
    Image.new("RGB", (32, 32), (30, 30, 200)).save(tmp_path / "square.png")
    examples = [Example(tmp_path / "wide.png", "red"), Example(tmp_path / "square.png", "blue")]
    batch = collate([ImageCaptionDataset(examples, 32, center_crop=True)[i] for i in range(2)])
    assert batch["size_conditions"].tolist() == [[64, 96, 0, 8], [32, 32, 0, 0]]
    # Random crops: the recorded crop is where the pixels came from.
    random_crops = ImageCaptionDataset(examples[:1], 32, center_crop=False, random_flip=True, seed=3)
    for draw in range(6):
        item = random_crops[(0, draw)]
        top, left = item["size_conditions"][2:].tolist()
        assert top == 0 and 0 <= left <= 16
    text = full_method.encode_prompts(batch["captions"])
    latents = torch.zeros(2, 4, 16, 16)
    added = full_method.added_conditions(text, batch["size_conditions"], latents)
    assert added["time_ids"].tolist() == [[64, 96, 0, 8, 32, 32], [32, 32, 0, 0, 32, 32]]
    # An uncropped square sample gets the time_ids the pipeline samples with (original = target, crop 0).
    pipe = build_pipeline(components, device=CPU)
    sampled = pipe._get_add_time_ids(
        (32, 32), (0, 0), (32, 32), torch.float32, text_encoder_projection_dim=32
    )
    torch.testing.assert_close(added["time_ids"][1:], sampled)


def test_the_loss_depends_on_the_recorded_crop(full_method):
    """The time_ids reach the UNet: the same sample with another recorded crop has another loss."""
    batch = {"pixel_values": torch.zeros(1, 3, 32, 32), "captions": ["a photo of sks"]}
    losses = []
    for sizes in ([[32, 32, 0, 0]], [[512, 512, 200, 100]]):
        with torch.no_grad():
            loss, _ = full_method.compute_loss(
                {**batch, "size_conditions": torch.tensor(sizes)}, torch.Generator().manual_seed(0)
            )
        losses.append(float(loss))
    assert losses[0] != losses[1]
    with pytest.raises(KeyError, match="size_conditions"):
        full_method.compute_loss(batch, torch.Generator().manual_seed(0))


def test_latent_cache_holds_both_encoders_pooled_text_and_sizes(
    tmp_path, components, full_method, demo_data_dir
):
    from sdsweep.data.examples import load_examples
    from sdsweep.data.images import collate
    from sdsweep.data.latent_cache import build_training_dataset

    cfg = full_method.cfg
    examples = load_examples(cfg)[:3]
    dataset = build_training_dataset(cfg, components, full_method, examples, tmp_path)
    items = [dataset[(i, 0)] for i in range(3)]
    batch = collate(items)
    assert batch["encoder_hidden_states"].shape == (3, 77, 64)  # both encoders' states
    assert batch["pooled_text_embeds"].shape == (3, 32)
    assert batch["size_conditions"].tolist() == [[64, 64, 0, 0]] * 3  # the 64 px demo images, uncropped
    encoded = full_method.encode_prompts(batch["captions"])
    torch.testing.assert_close(batch["encoder_hidden_states"], encoded.hidden_states)
    torch.testing.assert_close(batch["pooled_text_embeds"], encoded.pooled)
    # The cached batch and the pixel batch train on the same conditions.
    loss, _ = full_method.compute_loss(batch, torch.Generator().manual_seed(0))
    assert torch.isfinite(loss)


def test_bucketing_on_sdxl_is_a_config_error_naming_why(tmp_path, components, full_method):
    from dataclasses import replace

    from sdsweep.data.examples import load_examples
    from sdsweep.data.latent_cache import build_training_dataset
    from sdsweep.errors import ConfigError

    cfg = full_method.cfg
    cfg = replace(cfg, train=replace(cfg.train, bucketing=True))
    with pytest.raises(ConfigError, match="time_ids"):
        build_training_dataset(cfg, components, full_method, load_examples(cfg)[:2], tmp_path)


def run_cli(*args: str, timeout: int = 600):
    from test_cli import run_cli as run

    return run(*args, timeout=timeout)


def test_full_finetune_through_the_cli_saves_an_sdxl_pipeline(tmp_path):
    """``python -m sdsweep model=tiny_sdxl method=full``: trains, evaluates through StableDiffusionXLPipeline,
    and the weights load back in StableDiffusionXLPipeline with the trained UNet."""
    from diffusers import StableDiffusionXLPipeline

    from sdsweep.models import tiny

    result = run_cli(
        *SDXL_OVERRIDES,
        "method=full",
        "method.learning_rate=1e-3",
        "eval.metrics=[clip_score,val_loss]",
        f"paths.root={tmp_path}",
        "study=sdxl_full",
        "train.max_train_steps=2",
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    study = tmp_path / "sdxl_full"
    results = pd.read_csv(study / "results.csv")
    assert len(results) == 1 and results.loc[0, "state"] == "COMPLETE"
    assert np.isfinite(results.loc[0, "eval/clip_score"]) and np.isfinite(results.loc[0, "eval/val_loss"])
    weights = study / results.loc[0, "trial_dir"] / "weights"
    pipe = StableDiffusionXLPipeline.from_pretrained(weights)
    base = StableDiffusionXLPipeline.from_pretrained(tiny.ensure_tiny_model("sdxl"))
    trained, untouched = pipe.unet.state_dict(), base.unet.state_dict()
    assert any(not torch.equal(trained[k], untouched[k]) for k in untouched)  # the UNet trained
    for name in ("text_encoder", "text_encoder_2"):  # the frozen encoders are saved as they were
        mine, theirs = getattr(pipe, name).state_dict(), getattr(base, name).state_dict()
        assert all(torch.equal(mine[k], theirs[k]) for k in theirs)
    image = pipe(
        "a photo of sks",
        num_inference_steps=2,
        height=32,
        width=32,
        output_type="np",
        generator=torch.Generator().manual_seed(0),
    ).images[0]
    assert image.shape == (32, 32, 3) and np.isfinite(image).all()


def test_model_vae_path_replaces_the_vae(tmp_path, tiny_model_dirs):
    """``model.vae_path`` (the fp16-safe SDXL VAE in real use): a folder with a vae/ inside, or the VAE's own."""
    from sdsweep.models.loading import ModelUnavailableError, load_components

    other = tiny_model_dirs["sd15"]  # another VAE: SD's latent scale, not SDXL's
    for path in (other, other / "vae"):
        loaded = load_components(sdxl_config(tmp_path, f"model.vae_path={path}"), CPU)
        assert loaded.latent_scaling == pytest.approx(0.18215)
    assert load_components(sdxl_config(tmp_path), CPU).latent_scaling == pytest.approx(0.13025)
    with pytest.raises(ModelUnavailableError, match="model.vae_path"):
        load_components(sdxl_config(tmp_path, f"model.vae_path={tmp_path / 'missing'}"), CPU)
