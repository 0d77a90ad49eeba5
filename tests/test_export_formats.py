"""Export formats other tools load (issue 27), each loaded back by diffusers and compared image for image."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from sdsweep.results.export_formats import FormatError, a1111_embedding, kohya_lora, output_file

ROOT = Path(__file__).resolve().parents[1]


def images(pipe, prompt: str = "a photo of sks") -> np.ndarray:
    generator = torch.Generator().manual_seed(0)
    return pipe(prompt, num_inference_steps=2, generator=generator, output_type="np").images


def load(folder):
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline.from_pretrained(
        str(folder), safety_checker=None, requires_safety_checker=False
    )


@pytest.mark.slow
def test_single_file_export_loads_with_from_single_file_and_draws_the_same_images(finished_study, tmp_path):
    from diffusers import StableDiffusionPipeline

    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for fmt in ("diffusers", "single_file"):
        subprocess.run(
            [
                sys.executable,
                "-m",
                "sdsweep.export",
                str(finished_study),
                "--to",
                str(tmp_path / fmt),
                "--format",
                fmt,
            ],
            check=True,
            env=env,
            cwd=ROOT,
        )
    single = tmp_path / "single_file" / "model.safetensors"
    assert single.is_file() and not (tmp_path / "single_file" / "unet").exists()
    card = (tmp_path / "single_file" / "README.md").read_text()
    assert "## Formats" in card and "from_single_file" in card and "models/Stable-diffusion/" in card
    reference = load(tmp_path / "diffusers")
    loaded = StableDiffusionPipeline.from_single_file(
        str(single), config=str(tmp_path / "diffusers"), local_files_only=True, safety_checker=None
    )
    loaded.scheduler = (
        reference.scheduler
    )  # the single file holds weights only; the sampler comes with config
    for name in ("unet", "vae", "text_encoder"):
        ours, theirs = getattr(reference, name).state_dict(), getattr(loaded, name).state_dict()
        assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours), name
    np.testing.assert_array_equal(images(reference), images(loaded))

    # generate and the app take what export wrote, in either format, and draw the same image
    from PIL import Image

    from sdsweep.results.app import StudyApp
    from sdsweep.results.generate import generate

    pngs = []
    for fmt in ("diffusers", "single_file"):
        (png,) = generate(
            tmp_path / fmt, "a photo of sks", num_images=1, steps=2, out=tmp_path / f"{fmt}.png"
        )
        pngs.append(np.asarray(Image.open(png)))
    np.testing.assert_array_equal(pngs[0], pngs[1])
    app = StudyApp(tmp_path / "single_file", device="cpu")
    trial = app.choices()[1]
    assert app.choices() == ["baseline", trial] and not app.leaderboard().empty
    assert np.asarray(app.generate(trial, "a photo of sks", 0, 2)).shape == pngs[0].shape


def test_kohya_lora_loads_with_load_lora_weights_and_matches(tiny_model_dirs, tmp_path):
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import load_file

    base_dir = tiny_model_dirs["sd15"]
    pipe = load(base_dir)
    # The same calls as sdsweep's LoRA method's save(), on a non-zero adapter
    pipe.unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    torch.manual_seed(1)
    for name, param in pipe.unet.named_parameters():
        if "lora_B" in name:
            param.data.normal_(0, 0.5)
    lora_dir = tmp_path / "weights"
    StableDiffusionPipeline.save_lora_weights(
        lora_dir,
        unet_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(pipe.unet)),
        weight_name="pytorch_lora_weights.safetensors",
        safe_serialization=True,
    )
    kohya = kohya_lora(lora_dir / "pytorch_lora_weights.safetensors", tmp_path / "lora_kohya.safetensors")
    keys = load_file(str(kohya))
    assert all(k.startswith("lora_unet_") for k in keys) and any(k.endswith(".alpha") for k in keys)
    assert any(k.endswith(".lora_down.weight") for k in keys)
    untuned = images(load(base_dir))
    diffusers_lora, kohya_loaded = load(base_dir), load(base_dir)
    diffusers_lora.load_lora_weights(str(lora_dir))
    kohya_loaded.load_lora_weights(str(tmp_path), weight_name="lora_kohya.safetensors")
    tuned = images(diffusers_lora)
    assert np.abs(tuned - untuned).max() > 1e-3  # the adapter changes the images
    np.testing.assert_allclose(images(kohya_loaded), tuned, atol=1e-5)


def test_a1111_embedding_loads_with_load_textual_inversion(tiny_model_dirs, tmp_path):
    from safetensors.torch import load_file, save_file

    base_dir = tiny_model_dirs["sd15"]
    pipe = load(base_dir)
    width = pipe.text_encoder.get_input_embeddings().weight.shape[1]
    vectors = torch.randn(1, width, generator=torch.Generator().manual_seed(3))
    learned = tmp_path / "learned_embeds.safetensors"
    save_file({"<sks>": vectors}, str(learned))  # the layout sdsweep's textual inversion saves
    embedding = a1111_embedding(learned, tmp_path / "embedding.safetensors")
    assert set(load_file(str(embedding))) == {"emb_params"}
    pipe.load_textual_inversion(str(embedding), token="<sks>")
    token_id = pipe.tokenizer.convert_tokens_to_ids("<sks>")
    assert torch.equal(pipe.text_encoder.get_input_embeddings().weight[token_id], vectors[0])
    reference = load(base_dir)
    reference.load_textual_inversion(str(learned))
    np.testing.assert_array_equal(images(pipe, "a photo of <sks>"), images(reference, "a photo of <sks>"))


def test_single_file_is_refused_for_adapters_with_the_formats_that_fit():
    assert output_file("a1111", "lora") == "lora_kohya.safetensors"
    assert output_file("a1111", "textual_inversion") == "embedding.safetensors"
    assert output_file("a1111", "pipeline") == output_file("single_file", "pipeline") == "model.safetensors"
    with pytest.raises(FormatError, match="--format a1111"):
        output_file("single_file", "lora")
    with pytest.raises(FormatError, match="diffusers, single_file, a1111"):
        output_file("ckpt", "pipeline")
