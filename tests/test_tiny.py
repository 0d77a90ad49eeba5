"""The offline tiny builders: deterministic, real architectures, loadable like hub models."""

from __future__ import annotations

import json

import numpy as np
import torch
from PIL import Image

from sdsweep.models import tiny


def test_tokenizer_keeps_prompt_words_whole():
    tokenizer = tiny.build_tiny_tokenizer()
    assert tokenizer.model_max_length == 77
    for word in ("person", "sks", "painting", "photo"):
        assert len(tokenizer(word, add_special_tokens=False).input_ids) == 1, word


def test_tiny_pipelines_are_deterministic_and_loadable(tiny_model_dirs):
    from diffusers import StableDiffusionPipeline

    a = tiny.build_tiny_pipeline("sd15")
    b = tiny.build_tiny_pipeline("sd15")
    for (name, pa), (_, pb) in zip(a.unet.named_parameters(), b.unet.named_parameters()):
        assert torch.equal(pa, pb), name
    pipe = StableDiffusionPipeline.from_pretrained(tiny_model_dirs["sd15"])
    images = pipe(
        "a photo of sks",
        num_inference_steps=2,
        height=32,
        width=32,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
    ).images
    assert images.shape == (1, 32, 32, 3) and np.isfinite(images).all()


def test_sd21_flavour_predicts_v(tiny_model_dirs):
    from diffusers import DDPMScheduler, UNet2DConditionModel

    scheduler = DDPMScheduler.from_pretrained(tiny_model_dirs["sd21"], subfolder="scheduler")
    unet = UNet2DConditionModel.from_pretrained(tiny_model_dirs["sd21"], subfolder="unet")
    assert scheduler.config.prediction_type == "v_prediction"
    assert unet.config.use_linear_projection and unet.config.upcast_attention
    sd15 = DDPMScheduler.from_pretrained(tiny_model_dirs["sd15"], subfolder="scheduler")
    assert sd15.config.prediction_type == "epsilon"


def test_tiny_clip_embeds_text_and_images(tiny_clip_dir):
    from transformers import CLIPModel, CLIPProcessor

    model = CLIPModel.from_pretrained(tiny_clip_dir)
    processor = CLIPProcessor.from_pretrained(tiny_clip_dir)
    inputs = processor(
        text=["a photo of sks"], images=[Image.new("RGB", (64, 64), "red")], return_tensors="pt", padding=True
    )
    out = model(**inputs)
    assert out.logits_per_image.shape == (1, 1) and torch.isfinite(out.logits_per_image).all()


def test_demo_dataset_has_captions_with_the_trigger_word(demo_data_dir):
    lines = [json.loads(line) for line in (demo_data_dir / "metadata.jsonl").read_text().splitlines()]
    assert len(lines) == 10
    for line in lines:
        assert "sks" in line["text"]
        with Image.open(demo_data_dir / line["file_name"]) as image:
            assert image.size == (64, 64)
    # Built deterministically: a second build elsewhere is byte-identical.
    again = tiny.write_demo_dataset(demo_data_dir.parent / "again", num_images=10)
    assert (again / "000.png").read_bytes() == (demo_data_dir / "000.png").read_bytes()
