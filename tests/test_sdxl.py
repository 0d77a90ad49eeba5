"""SDXL as a model version: the tiny SDXL (two text encoders, pooled embedding, time_ids) built offline,
trained through the same loss and loop as SD, evaluated and saved through StableDiffusionXLPipeline."""

from __future__ import annotations

import json
import subprocess
import sys
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


def test_bucketing_records_each_images_bucket_crop_cached_or_not(tmp_path, components, full_method):
    """Aspect-ratio buckets on SDXL: each sample's time_ids say its original size and where its bucket crop
    came from, the same from the latent cache as from the pixels, and the target is the bucket's size."""
    from sdsweep.data.buckets import BucketedImageDataset, grid_for
    from sdsweep.data.examples import Example
    from sdsweep.data.images import collate
    from sdsweep.data.latent_cache import build_training_dataset

    examples = []
    for number, (width, height) in enumerate([(90, 40), (40, 90), (50, 50)]):
        Image.new("RGB", (width, height), (40 * number, 90, 200)).save(tmp_path / f"{number}.png")
        examples.append(Example(tmp_path / f"{number}.png", f"gradient {number}"))
    cfg = sdxl_config(tmp_path, "train.bucketing=true", "data.random_flip=true")
    grid = grid_for(cfg, components)
    pixels = BucketedImageDataset(examples, grid, center_crop=True, random_flip=True, seed=cfg.train.seed)
    cached = build_training_dataset(cfg, components, full_method, examples, tmp_path / "cache")
    for index in range(3):
        bucket = pixels.image_buckets[index]
        for draw in range(4):  # plain and flipped draws
            item, from_cache = pixels[(index, draw)], cached[(index, draw)]
            assert item["pixel_values"].shape[-2:] == (bucket[1], bucket[0])
            assert item["size_conditions"].tolist() == from_cache["size_conditions"].tolist()
            original = Image.open(examples[index].image_path).size
            assert item["size_conditions"][:2].tolist() == [original[1], original[0]]
    wide = pixels[(0, 0)]["size_conditions"].tolist()
    assert wide[2] == 0 and wide[3] > 0  # a wide image loses its sides: a left crop, no top crop
    batch = collate([pixels[(0, 0)]])
    text = full_method.encode_prompts(batch["captions"])
    latents = full_method.latents_of(batch)
    added = full_method.added_conditions(text, batch["size_conditions"], latents)
    bucket = pixels.image_buckets[0]
    assert added["time_ids"][0, 4:].tolist() == [bucket[1], bucket[0]]  # target: the bucket, (h, w)
    loss, _ = full_method.compute_loss(batch, torch.Generator().manual_seed(0))
    assert torch.isfinite(loss)


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
    # Export as a user types it: the diffusers folder loads in StableDiffusionXLPipeline and its card says so;
    # --format single_file writes the original SDXL checkpoint, whose card loads it with the SDXL pipeline.
    for fmt in ("diffusers", "single_file"):
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "sdsweep.export",
                str(study),
                "--to",
                str(tmp_path / fmt),
                "--format",
                fmt,
            ],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    card = (tmp_path / "diffusers" / "README.md").read_text()
    assert (
        "from diffusers import StableDiffusionXLPipeline" in card and "StableDiffusionPipeline." not in card
    )
    assert (
        StableDiffusionXLPipeline.from_pretrained(tmp_path / "diffusers").unet.state_dict().keys()
        == trained.keys()
    )
    from sdsweep.results.single_file import load_single_file

    assert (
        "StableDiffusionXLPipeline.from_single_file" in (tmp_path / "single_file" / "README.md").read_text()
    )
    single = load_single_file(tmp_path / "single_file" / "model.safetensors", tiny.ensure_tiny_model("sdxl"))
    assert all(torch.equal(single.unet.state_dict()[k], v) for k, v in trained.items())


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


# ---- every method on the tiny SDXL -------------------------------------------------------------------
LEARNING_RATES = {"full": 1e-3, "dreambooth": 1e-3, "textual_inversion": 5e-2, "lora": 1e-2}
METHOD_EXTRAS = {
    "dreambooth": ["method.num_class_images=2", "eval.batch_size=2"],
    # UNet and both text encoders; alpha != rank, so a reload that ignored the trained alpha would differ
    "lora": ["method.train_text_encoder=true", "method.alpha=8"],
    "textual_inversion": [],
    "full": [],
}


def training_batch(method) -> dict:
    """Two demo images through the real pixel dataset (captions transformed by the method, sizes recorded)."""
    from sdsweep.data.examples import load_examples
    from sdsweep.data.images import collate, dataset_for

    dataset = dataset_for(method.cfg, load_examples(method.cfg)[:2], method.transform_caption)
    return collate([dataset[(i, 0)] for i in range(2)])


def snapshot(method) -> dict[str, torch.Tensor]:
    parts = {"unet": method.components.unet, "text_encoder": method.components.text_encoder}
    parts["text_encoder_2"] = method.components.text_encoder_2
    return {f"{p}.{n}": t.detach().clone() for p, m in parts.items() for n, t in m.named_parameters()}


@pytest.fixture(scope="module")
def trained_sdxl(tmp_path_factory):
    """method name -> a method trained 4 steps on the tiny SDXL (fresh components each), with its snapshot."""
    from sdsweep.models.loading import load_components
    from sdsweep.training.methods import get_method

    runs = {}

    def get(name: str, *extra: str):
        if (name, extra) not in runs:
            folder = tmp_path_factory.mktemp(f"sdxl-{name}")
            overrides = [f"method={name}", "eval.num_inference_steps=2", *METHOD_EXTRAS[name], *extra]
            cfg = sdxl_config(folder, *overrides)
            method = get_method(name)(cfg, load_components(cfg, CPU), CPU, cache_dir=folder / "cache")
            method.prepare()
            before = snapshot(method)
            optimizer = torch.optim.AdamW(
                method.trainable_parameters(), lr=LEARNING_RATES[name], weight_decay=0
            )
            method.set_train_mode(True)
            for step in range(4):
                batch = method.augment_batch(training_batch(method))
                loss, logs = method.compute_loss(batch, torch.Generator().manual_seed(step))
                assert torch.isfinite(loss) and "train/loss" in logs
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                method.after_optimizer_step()
            method.set_train_mode(False)
            after = snapshot(method)
            changed = {k for k, v in before.items() if k in after and not torch.equal(v, after[k])}
            runs[(name, extra)] = (method, changed, logs)
        return runs[(name, extra)]

    return get


def generate(pipe, prompt: str) -> np.ndarray:
    return pipe(
        prompt,
        num_inference_steps=2,
        height=32,
        width=32,
        output_type="np",
        generator=torch.Generator().manual_seed(0),
    ).images[0]


@pytest.mark.parametrize("name", ["dreambooth", "lora", "textual_inversion"])
def test_sdxl_method_saves_and_reloads_in_the_sdxl_pipeline(trained_sdxl, tmp_path, name):
    """Each method trains on the tiny SDXL, and what it saves loads back in StableDiffusionXLPipeline through
    diffusers' own loaders, drawing the live model's image."""
    from diffusers import StableDiffusionXLPipeline

    from sdsweep.training.methods import load_trained_pipeline

    method, changed, _ = trained_sdxl(name)
    assert changed
    written = method.save(tmp_path / "weights")
    assert written.exists()
    reloaded = load_trained_pipeline(method.cfg, tmp_path / "weights", CPU)
    assert isinstance(reloaded, StableDiffusionXLPipeline)
    prompt = "a photo of <sks>" if name == "textual_inversion" else "a photo of sks"
    image = generate(reloaded, prompt)
    assert np.isfinite(image).all()
    np.testing.assert_allclose(image, generate(method.pipeline_for_eval("dpmsolver++"), prompt), atol=1e-4)


def test_sdxl_lora_adapts_the_unet_and_both_text_encoders(trained_sdxl, tmp_path):
    from safetensors.torch import load_file

    method, changed, _ = trained_sdxl("lora")
    assert changed and all("lora" in name for name in changed)
    assert {name.split(".")[0] for name in changed} == {"unet", "text_encoder", "text_encoder_2"}
    # SDXL reads the first encoder's penultimate layer: its last layer's adapters would never train (and DDP
    # refuses parameters without a gradient), so they stay frozen; the second encoder's last layer trains.
    assert not any(name.startswith("text_encoder.encoder.layers.1.") for name in changed)
    assert any(name.startswith("text_encoder_2.") and ".encoder.layers.1." in name for name in changed)
    keys = load_file(str(method.save(tmp_path / "w"))).keys()
    assert {key.split(".")[0] for key in keys} == {"unet", "text_encoder", "text_encoder_2"}


def test_sdxl_dreambooth_preserves_the_prior_with_class_images(trained_sdxl):
    method, changed, logs = trained_sdxl("dreambooth")
    assert {"train/instance_loss", "train/prior_loss"} <= set(logs)
    assert len(list(method.class_images_dir().glob("*.png"))) == 2  # generated by the SDXL pipeline
    assert {name.split(".")[0] for name in changed} == {"unet"}


def test_sdxl_textual_inversion_learns_one_token_per_encoder(trained_sdxl, tmp_path):
    """One new row in each encoder, nothing else; saved as clip_l / clip_g for load_textual_inversion."""
    from safetensors.torch import load_file

    method, changed, _ = trained_sdxl("textual_inversion")
    assert {name.split(".")[0] for name in changed} == {"text_encoder", "text_encoder_2"}
    assert all(name.endswith("token_embedding.weight") for name in changed)
    for i, encoder in enumerate(method.components.text_encoders):
        weight = encoder.get_input_embeddings().weight
        rows = method.encoder_token_ids[i]
        torch.testing.assert_close(
            weight[method.frozen_rows[i]], method.original_embeddings[i][method.frozen_rows[i]]
        )
        assert not torch.equal(weight[rows], method.original_embeddings[i][rows])
    saved = load_file(str(method.save(tmp_path / "w")))
    assert set(saved) == {"clip_l", "clip_g"} and saved["clip_l"].shape == (1, 32)
    torch.testing.assert_close(saved["clip_g"], method.learned_embeddings(1))
    restored = method.state_dict()
    assert set(restored) == {"textual_inversion.embeddings", "textual_inversion.embeddings_2"}


# ---- export in the formats AUTOMATIC1111 / ComfyUI load -------------------------------------------------
def base_sdxl(device=CPU):
    from sdsweep.models import tiny
    from sdsweep.models.loading import load_pipeline

    return load_pipeline(str(tiny.ensure_tiny_model("sdxl")), "dpmsolver++", device)


def test_sdxl_lora_file_stores_alpha_and_exports_as_kohya_that_loads_back(trained_sdxl, tmp_path):
    """The diffusers file carries each part's lora_alpha (8 on the UNet, rank 4), and the kohya file has
    lora_unet_/lora_te1_/lora_te2_ modules with their alpha; both load with load_lora_weights onto the base
    SDXL and draw the live model's image."""
    from dataclasses import asdict

    from safetensors.torch import load_file

    from sdsweep.results import export_formats

    method, _, _ = trained_sdxl("lora")
    saved = method.save(tmp_path / "weights")
    assert export_formats._lora_alphas(saved) == {"unet": 8.0, "text_encoder": 4.0, "text_encoder_2": 4.0}
    config = {"method": asdict(method.cfg.method)}  # what export reads from the trial's config
    (tmp_path / "kohya").mkdir()
    kohya = export_formats.kohya_lora(saved, tmp_path / "kohya" / "lora.safetensors")  # alphas: from the file
    state = load_file(str(kohya))
    modules = {key.split(".")[0] for key in state}
    assert {m.split("_")[1] for m in modules} == {"unet", "te1", "te2"}
    alphas = {m.split("_")[1]: float(state[f"{m}.alpha"]) for m in modules}
    assert alphas == {"unet": 8.0, "te1": 4.0, "te2": 4.0}
    assert export_formats.lora_alphas(config) == {"unet": 8.0, "text_encoder": 4.0, "text_encoder_2": 4.0}
    expected = generate(method.pipeline_for_eval("dpmsolver++"), "a photo of sks")
    for folder, name in ((saved.parent, saved.name), (kohya.parent, kohya.name)):
        pipe = base_sdxl()
        pipe.load_lora_weights(str(folder), weight_name=name)
        np.testing.assert_allclose(generate(pipe, "a photo of sks"), expected, atol=1e-4)


def test_sdxl_single_file_has_the_original_layout_and_loads_back_exactly(trained_sdxl, tmp_path):
    """A trained SDXL pipeline as one checkpoint: UNet (label_emb: the added conditions), VAE, CLIP and OpenCLIP
    encoders where A1111/ComfyUI read them; diffusers' from_single_file (and its OpenCLIP converter) gives
    back every weight bit for bit and the same image."""
    from safetensors.torch import load_file

    from sdsweep.models import tiny
    from sdsweep.results.single_file import load_single_file, write_single_file

    method, _, _ = trained_sdxl("dreambooth")
    method.save(tmp_path / "weights")
    path = write_single_file(tmp_path / "weights", tmp_path / "model.safetensors")
    keys = load_file(str(path)).keys()
    assert {".".join(k.split(".")[:3]) for k in keys if k.startswith("conditioner.")} == {
        "conditioner.embedders.0",
        "conditioner.embedders.1",
    }
    assert {
        "model.diffusion_model.label_emb.0.0.weight",
        "conditioner.embedders.0.transformer.text_model.embeddings.position_embedding.weight",
        "conditioner.embedders.1.model.positional_embedding",
        "conditioner.embedders.1.model.text_projection",
        "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight",
        "first_stage_model.decoder.mid.attn_1.q.weight",
    } <= set(keys)
    loaded = load_single_file(path, tiny.ensure_tiny_model("sdxl"))
    reference = method.pipeline_for_eval("dpmsolver++")
    for part in ("unet", "vae", "text_encoder", "text_encoder_2"):
        ours, theirs = getattr(reference, part).state_dict(), getattr(loaded, part).state_dict()
        assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours), part
    loaded.scheduler = reference.scheduler  # the file holds weights; the sampler comes with the config
    np.testing.assert_allclose(
        generate(loaded, "a photo of sks"), generate(reference, "a photo of sks"), atol=1e-5
    )


def test_sdxl_multi_vector_textual_inversion_trains_reloads_and_exports(trained_sdxl, tmp_path):
    """num_vectors=3 on the tiny SDXL: three rows per encoder train, the file holds [3, dim] per encoder, and
    the A1111 embedding (clip_l / clip_g) loads back into the base SDXL drawing the live model's image."""
    from safetensors.torch import load_file

    from sdsweep.results import export_formats
    from sdsweep.training.methods.textual_inversion import load_embeddings

    method, changed, _ = trained_sdxl("textual_inversion", "method.num_vectors=3")
    assert {name.split(".")[0] for name in changed} == {"text_encoder", "text_encoder_2"}
    for i, encoder in enumerate(method.components.text_encoders):
        rows = method.encoder_token_ids[i]
        assert len(rows) == 3
        weight = encoder.get_input_embeddings().weight
        assert all(not torch.equal(weight[r], method.original_embeddings[i][r]) for r in rows)
    saved = method.save(tmp_path / "weights")
    state = load_file(str(saved))
    assert state["clip_l"].shape == (3, 32) and state["clip_g"].shape == (3, 32)
    a1111 = export_formats.a1111_embedding(saved, tmp_path / "embedding.safetensors")
    assert load_file(str(a1111)).keys() == {"clip_l", "clip_g"}
    prompt = "a photo of <sks>"
    expected = generate(method.pipeline_for_eval("dpmsolver++"), prompt)
    for file in (saved, a1111):
        pipe = base_sdxl()
        load_embeddings(pipe, file, method.cfg.method.placeholder_token)
        np.testing.assert_allclose(generate(pipe, prompt), expected, atol=1e-4)


# ---- resume after an interruption, through the real training loop and the latent cache ----------------
def loop_setup(folder: Path, *extra: str):
    """A fresh process's view: the tiny SDXL loaded anew, the method prepared, the study's cached dataset."""
    from sdsweep.data.examples import load_examples, split_examples
    from sdsweep.data.latent_cache import build_training_dataset
    from sdsweep.models.loading import load_components
    from sdsweep.training.methods import get_method

    cfg = sdxl_config(folder, "train.train_batch_size=2", *extra)
    components = load_components(cfg, CPU)
    torch.manual_seed(0)
    method = get_method(cfg.method.name)(cfg, components, CPU, folder / "cache")
    method.prepare()
    examples, _ = split_examples(load_examples(cfg), cfg.data.num_heldout)
    return cfg, method, build_training_dataset(cfg, components, method, examples, folder / "cache")


RESUMED = {
    # LoRA on the UNet and both encoders, from cached latents, pooled embeddings and sizes, half the
    # captions dropped (the cached empty caption's pooled embedding too).
    "lora": ["method=lora", "method.learning_rate=1e-2", "train.caption_dropout=0.5"],
    # Both encoders' new rows checkpointed and restored (captions encoded per step: templates).
    "textual_inversion": ["method=textual_inversion", "method.learning_rate=5e-2"],
}


@pytest.mark.parametrize("name", sorted(RESUMED))
def test_sdxl_training_resumes_like_an_uninterrupted_run(tmp_path, name):
    from sdsweep.training.train import TrainHooks, train

    extra = RESUMED[name]
    losses: list[float] = []
    cfg, method, dataset = loop_setup(tmp_path, *extra)
    if name == "lora":
        assert {"pooled_text_embeds", "size_conditions", "latents"} <= set(dataset[(0, 0)])  # all cached
    hooks = TrainHooks(on_step=lambda step, logs: losses.append(logs["train/loss"]))
    train(cfg, method, dataset, [1, 2], hooks, tmp_path / "straight")
    expected = [p.detach().clone() for p in method.trainable_parameters()]

    resumed_losses: list[float] = []
    hooks = TrainHooks(on_step=lambda step, logs: resumed_losses.append(logs["train/loss"]))
    cfg, method, dataset = loop_setup(tmp_path, *extra)
    train(cfg, method, dataset, [1], hooks, tmp_path / "resumed")
    cfg, method, dataset = loop_setup(tmp_path, *extra)  # killed after step 1: a new process
    train(cfg, method, dataset, [2], hooks, tmp_path / "resumed")
    assert resumed_losses == losses and all(np.isfinite(losses))
    for resumed, uninterrupted in zip(method.trainable_parameters(), expected, strict=True):
        assert torch.equal(resumed.detach(), uninterrupted)


# ---- memory prediction ----------------------------------------------------------------------------------
def test_memory_prediction_traces_the_sdxl_unet_like_a_real_forward(components):
    """The meta trace (with SDXL's added conditions) keeps what a real forward of the tiny SDXL UNet keeps,
    within the tolerance the SD test allows; the second encoder's weights and trained rows are counted."""
    import copy

    from sdsweep.models import tiny
    from sdsweep.training.memory import estimate_training_memory, load_model_configs
    from sdsweep.training.memory_trace import SavedTensorCounter, TrainingFootprint

    configs = load_model_configs(str(tiny.ensure_tiny_model("sdxl")))
    assert "text_encoder_2" in configs
    unet = copy.deepcopy(components.unet).requires_grad_(True).train()
    counter = SavedTensorCounter(unet.parameters())
    added = {"text_embeds": torch.randn(2, 32), "time_ids": torch.tensor([[32.0, 32, 0, 0, 32, 32]] * 2)}
    with counter:
        unet(
            torch.randn(2, 4, 16, 16),
            torch.tensor([10, 500]),
            torch.randn(2, 77, 64),
            added_cond_kwargs=added,
        )

    def footprint(method: str) -> TrainingFootprint:
        return TrainingFootprint(method, 2, 32, torch.float32, torch.float32)

    full = estimate_training_memory(configs, footprint("full"))
    assert counter.total <= full.activations <= 1.1 * counter.total
    encoders = components.text_encoders
    all_weights = sum(p.numel() for m in (components.unet, components.vae, *encoders) for p in m.parameters())
    assert full.weights == 4 * all_weights  # fp32 on CPU: both encoders counted
    inversion = estimate_training_memory(configs, footprint("textual_inversion"))
    tables = sum(e.get_input_embeddings().weight.numel() for e in encoders)
    assert inversion.trainable_parameters == tables  # one embedding table per encoder


# ---- the model x method study ---------------------------------------------------------------------------
@pytest.mark.slow
def test_methods_sweep_spans_sd_and_sdxl_each_with_its_own_baseline(tmp_path):
    from sdsweep.sweep.driver import run_sweep

    outcome = run_sweep(
        TINY_OVERRIDES
        + [
            "+sweep=methods",
            "sweep.sampler=grid",
            "sweep.isolation=inprocess",
            "sweep.params.model.choices=[tiny,tiny_sdxl]",
            "sweep.params.method.choices=[lora]",
            "~sweep.learning_rate_by_method.lora",  # a grid at one lr (the grid refuses a range it cannot draw)
            "method.learning_rate=1e-3",
            "sweep.steps=[2]",
            "sweep.objectives=[{metric: eval/clip_score, direction: maximize}]",
            "sweep.constraints=[]",
            "eval.metrics=[clip_score,val_loss]",
            f"paths.root={tmp_path}",
            "study=models",
        ]
    )
    assert outcome.finished
    results = pd.read_csv(outcome.results_csv)
    assert sorted(results["model"]) == ["tiny", "tiny_sdxl"] and (results["state"] == "COMPLETE").all()
    for _, row in results.iterrows():
        config = (outcome.study_dir / row["trial_dir"] / "config.yaml").read_text()
        assert ("tiny:sdxl" in config) == (row["model"] == "tiny_sdxl")
    for model in ("tiny", "tiny_sdxl"):  # each version against its own untuned self
        assert any((outcome.study_dir / "baseline" / model).iterdir())


# ---- recipe knobs ---------------------------------------------------------------------------------------
def test_recipe_knobs_that_apply_change_the_sdxl_loss_and_zero_snr_is_refused(tmp_path, components):
    """Noise offset, input perturbation and min-SNR act on SDXL's loss as on SD's; zero-terminal SNR on this
    epsilon model is the ConfigError SD gives, naming why."""
    from sdsweep.errors import ConfigError
    from sdsweep.models.loading import load_components
    from sdsweep.training.methods import get_method

    def loss_with(*extra: str) -> float:
        cfg = sdxl_config(tmp_path, "method=full", *extra)
        method = get_method("full")(cfg, components, CPU)
        batch = {
            "pixel_values": torch.zeros(2, 3, 32, 32),
            "captions": ["a photo of sks", "red"],
            "size_conditions": torch.tensor([[32, 32, 0, 0]] * 2),
            "noise_seeds": torch.tensor([1, 2]),  # the training draw: augmentations apply
        }
        with torch.no_grad():
            return float(method.compute_loss(batch)[0])

    plain = loss_with()
    # A gamma below every timestep's SNR, so that min-SNR changes the weight of whatever timestep is drawn.
    for knob in ("train.noise_offset=0.1", "train.input_perturbation=0.1", "train.snr_gamma=0.0001"):
        assert loss_with(knob) != plain, knob
    with pytest.raises(ConfigError, match="epsilon"):
        load_components(sdxl_config(tmp_path, "train.zero_terminal_snr=true"), CPU)


# ---- data parallel ----------------------------------------------------------------------------------------
@pytest.mark.slow
def test_two_ranks_train_sdxl_lora_on_both_encoders_like_one_process(tmp_path):
    """LoRA on the UNet and both text encoders on 2 gloo ranks (text_encoder_2 goes through DDP too) against one
    process with the doubled batch: the same losses and the same saved adapters."""
    from safetensors.torch import load_file
    from test_ddp import rank_processes, single_run

    options = [
        "model=tiny_sdxl",
        "method=lora",
        "method.learning_rate=3e-3",
        "method.train_text_encoder=true",
    ]
    _, one_dir, one = single_run(
        tmp_path, "one", *options, "train.train_batch_size=2", "train.num_processes=1"
    )
    _, two_dir, two = single_run(
        tmp_path, "two", *options, "train.train_batch_size=1", "train.num_processes=2"
    )
    assert one["state"] == two["state"] == "COMPLETE", (one["fail_reason"], two["fail_reason"])
    one_losses = [h["train/loss"] for h in one["history"]]
    two_losses = [h["train/loss"] for h in two["history"]]
    assert two_losses == pytest.approx(one_losses, rel=1e-5, abs=1e-6)
    one_w = load_file(str(one_dir / "weights" / "pytorch_lora_weights.safetensors"))
    two_w = load_file(str(two_dir / "weights" / "pytorch_lora_weights.safetensors"))
    assert one_w.keys() == two_w.keys() and any(k.startswith("text_encoder_2.") for k in one_w)
    # The up (B) matrices start at zero: their norm is the update, which both runs must agree on to 1 %.
    up = [k for k in one_w if "lora_B" in k or "lora.up" in k]
    update = sum(float(one_w[k].norm() ** 2) for k in up) ** 0.5
    gap = sum(float((one_w[k] - two_w[k]).norm() ** 2) for k in up) ** 0.5
    assert update > 0 and gap / update < 0.01, (gap, update)
    assert rank_processes() == []


def test_sdxl_full_with_text_encoders_trains_both_but_the_unread_layer(tmp_path):
    """method.train_text_encoder=true on SDXL trains the UNet and both encoders (as diffusers' SDXL script),
    except the first encoder's last layer and final norm, which SDXL never reads."""
    from sdsweep.models.loading import load_components
    from sdsweep.training.methods import get_method

    cfg = sdxl_config(tmp_path, "method=full", "method.train_text_encoder=true")
    method = get_method("full")(cfg, load_components(cfg, CPU), CPU)
    method.prepare()
    trained = {id(p) for p in method.trainable_parameters()}
    for part in ("unet", "text_encoder", "text_encoder_2"):
        module = getattr(method.components, part)
        assert any(id(p) in trained for p in module.parameters()), part
    unread = method.components.version.unread_text_modules(method.components.text_encoders)
    assert unread and not any(id(p) in trained for m in unread for p in m.parameters())
    before = snapshot(method)
    loss, _ = method.compute_loss(training_batch(method), torch.Generator().manual_seed(0))
    loss.backward()
    torch.optim.SGD(method.trainable_parameters(), lr=1.0).step()
    after = snapshot(method)
    changed = {k.split(".")[0] for k, v in before.items() if not torch.equal(v, after[k])}
    assert changed == {"unet", "text_encoder", "text_encoder_2"}
