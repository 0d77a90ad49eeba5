"""Every fine-tuning method on the real tiny SD-1.5 (epsilon) and SD-2.1 (v-prediction) models.

Each (method, model) pair is trained once per module by a small local optimisation loop; the tests
then inspect what changed, the saved files and what diffusers' own loaders make of them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_OVERRIDES, compose
from PIL import Image

MODELS = ["tiny", "tiny_sd21"]
METHOD_NAMES = ["full", "dreambooth", "textual_inversion", "lora"]
# Large enough for the tiny random-weight model to move in a few steps (real models use ~100x less).
LEARNING_RATES = {"full": 1e-3, "dreambooth": 1e-3, "textual_inversion": 5e-2, "lora": 1e-2}
TRAIN_STEPS = 8
VALIDATION_SEEDS = range(3)
NUM_TRAINING_IMAGES = 4
RESOLUTION = 32
CPU = torch.device("cpu")


# ---- helpers -------------------------------------------------------------------------------------
def method_config(method: str, model: str, *extra: str):
    # num_class_images is a DreamBooth option: other methods reject it (sdsweep.config.methods).
    own = ["method.num_class_images=3"] if method == "dreambooth" else []
    return compose(
        TINY_OVERRIDES
        + [f"model={model}", f"method={method}", *own, "eval.num_inference_steps=2"]
        + list(extra)
    )


def build_method(method: str, model: str, cache_dir: Path, *extra: str, prepare: bool = True):
    """A method on freshly loaded components (methods add tokens/adapters to the modules they get)."""
    from sdsweep.models.loading import load_components
    from sdsweep.training.methods import get_method

    cfg = method_config(method, model, *extra)
    instance = get_method(method)(cfg, load_components(cfg, CPU), CPU, cache_dir=cache_dir)
    if prepare:
        instance.prepare()
    return instance


def captioned_batch(method, images: dict) -> dict:
    return {
        "pixel_values": images["pixel_values"],
        "captions": [method.transform_caption(c) for c in images["captions"]],
    }


def validation_loss(method, batch: dict) -> float:
    with torch.no_grad():
        losses = [method.compute_loss(batch, torch.Generator().manual_seed(s))[0] for s in VALIDATION_SEEDS]
    return float(torch.stack(losses).mean())


def named_snapshot(method) -> dict[str, torch.Tensor]:
    modules = {"unet": method.components.unet, "text_encoder": method.components.text_encoder}
    return {
        f"{prefix}.{name}": p.detach().clone()
        for prefix, module in modules.items()
        for name, p in module.named_parameters()
    }


def generate(pipe, prompt: str, seed: int = 0) -> np.ndarray:
    return pipe(
        prompt,
        num_inference_steps=2,
        height=RESOLUTION,
        width=RESOLUTION,
        generator=torch.Generator().manual_seed(seed),
        output_type="np",
    ).images[0]


# ---- fixtures ------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def training_images(demo_data_dir):
    """The first demo images as [-1, 1] tensors at 32 px, with their captions."""
    rows = [json.loads(line) for line in (demo_data_dir / "metadata.jsonl").read_text().splitlines()]
    rows = rows[:NUM_TRAINING_IMAGES]
    tensors = []
    for row in rows:
        with Image.open(demo_data_dir / row["file_name"]) as image:
            pixels = np.asarray(image.convert("RGB").resize((RESOLUTION, RESOLUTION)), dtype=np.float32)
        tensors.append(torch.from_numpy(pixels / 127.5 - 1.0).permute(2, 0, 1))
    return {"pixel_values": torch.stack(tensors), "captions": [row["text"] for row in rows]}


@pytest.fixture(scope="module")
def study_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("study-cache")


@dataclass
class TrainedRun:
    method: object
    before: dict[str, torch.Tensor]  # every UNet / text-encoder parameter right after prepare()
    loss_before: float
    loss_after: float

    def changed(self) -> set[str]:
        after = named_snapshot(self.method)
        return {name for name, value in self.before.items() if not torch.equal(value, after[name])}


@pytest.fixture(scope="module")
def trained(study_cache, training_images):
    """(method, model) -> TrainedRun, each trained once and on demand.

    The loop draws its noise and timesteps from the same fixed seeds the validation loss uses, so it
    minimises exactly the objective it is scored on: on a random-weight model that is the only way a
    few steps show an unambiguous decrease for every method (textual inversion moves the loss little).
    """
    runs: dict[tuple[str, str], TrainedRun] = {}

    def get(method_name: str, model: str) -> TrainedRun:
        if (method_name, model) not in runs:
            torch.manual_seed(0)
            method = build_method(method_name, model, study_cache)
            validation_batch = captioned_batch(method, training_images)
            before, loss_before = named_snapshot(method), validation_loss(method, validation_batch)
            optimizer = torch.optim.AdamW(
                method.trainable_parameters(), lr=LEARNING_RATES[method_name], weight_decay=1e-2
            )
            method.set_train_mode(True)
            for step in range(TRAIN_STEPS):
                batch = method.augment_batch(captioned_batch(method, training_images))
                seed = VALIDATION_SEEDS[step % len(VALIDATION_SEEDS)]
                loss, logs = method.compute_loss(batch, torch.Generator().manual_seed(seed))
                assert torch.isfinite(loss) and "train/loss" in logs
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                method.after_optimizer_step()
            method.set_train_mode(False)
            runs[method_name, model] = TrainedRun(
                method, before, loss_before, validation_loss(method, validation_batch)
            )
        return runs[method_name, model]

    return get


# ---- every method ----------------------------------------------------------------------------------
@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("method_name", METHOD_NAMES)
def test_training_lowers_the_fixed_seed_validation_loss(trained, method_name, model):
    run = trained(method_name, model)
    assert run.loss_after < run.loss_before, (method_name, model, run.loss_before, run.loss_after)


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("method_name", METHOD_NAMES)
def test_saved_weights_reload_through_diffusers_and_generate(trained, tmp_path, method_name, model):
    """The saved output loads with diffusers' loaders and reproduces the live model's image."""
    from sdsweep.training.methods import load_trained_pipeline

    method = trained(method_name, model).method
    written = method.save(tmp_path / "weights")
    assert written.exists()
    prompt = "a photo of <sks>" if method_name == "textual_inversion" else "a photo of sks"
    reloaded = load_trained_pipeline(method.cfg, tmp_path / "weights", CPU)
    image = generate(reloaded, prompt)
    assert image.shape == (RESOLUTION, RESOLUTION, 3) and np.isfinite(image).all()
    np.testing.assert_allclose(image, generate(method.pipeline_for_eval("dpmsolver++"), prompt), atol=1e-4)


def test_unknown_method_names_the_allowed_ones():
    from sdsweep.errors import ConfigError
    from sdsweep.training.methods import METHODS, get_method

    assert sorted(METHODS) == sorted(METHOD_NAMES)
    with pytest.raises(ConfigError, match="dreambooth.*full.*lora.*textual_inversion"):
        get_method("hypernetwork")


@pytest.mark.parametrize("method_name", METHOD_NAMES)
def test_state_dict_restores_the_trained_parameters(trained, study_cache, method_name):
    from safetensors.torch import load, save

    source = trained(method_name, "tiny").method
    # Through safetensors bytes, as the training loop's checkpoints store it.
    state = load(save({k: v.contiguous() for k, v in source.state_dict().items()}))
    fresh = build_method(method_name, "tiny", study_cache)
    fresh.load_state_dict(state)
    for trained_param, restored in zip(source.trainable_parameters(), fresh.trainable_parameters()):
        assert torch.equal(trained_param, restored)


# ---- full ----------------------------------------------------------------------------------------------
def test_full_trains_the_unet_and_leaves_the_text_encoder(trained):
    run = trained("full", "tiny")
    changed = run.changed()
    assert any(name.startswith("unet.") for name in changed)
    assert not any(name.startswith("text_encoder.") for name in changed)
    assert run.method.uses_frozen_text_encoder()


def test_full_with_random_noise_and_text_encoder_training(study_cache, training_images):
    """The training path proper (no generator) also lowers the loss, and trains the text encoder."""
    torch.manual_seed(0)
    method = build_method("full", "tiny", study_cache, "method.train_text_encoder=true")
    assert not method.uses_frozen_text_encoder()
    batch = captioned_batch(method, training_images)
    encoder_before = [p.detach().clone() for p in method.components.text_encoder.parameters()]
    loss_before = validation_loss(method, batch)
    optimizer = torch.optim.AdamW(method.trainable_parameters(), lr=1e-3)
    for _ in range(TRAIN_STEPS):
        loss, _ = method.compute_loss(method.augment_batch(batch))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        method.after_optimizer_step()
    assert validation_loss(method, batch) < loss_before
    after = list(method.components.text_encoder.parameters())
    assert any(not torch.equal(b, a) for b, a in zip(encoder_before, after))


def test_full_ema_weights_are_evaluated_and_saved(study_cache, training_images, tmp_path):
    from diffusers import UNet2DConditionModel

    method = build_method("full", "tiny", study_cache, "method.use_ema=true", "method.ema_decay=0.5")
    optimizer = torch.optim.AdamW(method.trainable_parameters(), lr=1e-3)
    for _ in range(3):
        loss, _ = method.compute_loss(captioned_batch(method, training_images))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        method.after_optimizer_step()
    shadow = method.ema.shadow_params
    live = list(method.components.unet.parameters())
    assert any(not torch.equal(s, p) for s, p in zip(shadow, live))  # the average lags the live weights
    evaluated = list(method.pipeline_for_eval().unet.parameters())
    assert all(torch.equal(s, p) for s, p in zip(shadow, evaluated))
    saved = UNet2DConditionModel.from_pretrained(method.save(tmp_path / "weights") / "unet")
    assert all(torch.equal(s, p) for s, p in zip(shadow, saved.parameters()))
    assert method.components.unet.training  # evaluating EMA weights did not touch the live model


# ---- DreamBooth ------------------------------------------------------------------------------------------
def test_dreambooth_loss_is_instance_mean_plus_weighted_prior_mean(study_cache, training_images):
    from sdsweep.training.loss import denoising_loss

    method = build_method("dreambooth", "tiny", study_cache, "method.prior_loss_weight=0.5")
    batch = method.augment_batch(captioned_batch(method, training_images))
    count = NUM_TRAINING_IMAGES
    assert batch["class_latents"].shape == (count, 4, 16, 16)
    assert set(batch["captions"]) == {"a photo of sks"}  # the instance prompt for every image
    with torch.no_grad():
        loss, logs = method.compute_loss(batch, torch.Generator().manual_seed(3))
        # The two halves, computed separately from the same draws (per-sample losses are independent).
        latents = torch.cat([method.latents_of(batch, generator=torch.Generator()), batch["class_latents"]])
        text = torch.cat([method.encode_text(batch["captions"]), batch["class_encoder_hidden_states"]])
        per_sample = denoising_loss(
            method.components, latents, text, generator=torch.Generator().manual_seed(3)
        )
    instance_half, class_half = per_sample[:count].mean(), per_sample[count:].mean()
    torch.testing.assert_close(loss, instance_half + 0.5 * class_half)
    torch.testing.assert_close(logs["train/instance_loss"], instance_half)
    torch.testing.assert_close(logs["train/prior_loss"], class_half)
    # Without class samples (validation) the loss is the instance loss alone.
    with torch.no_grad():
        instance_only, _ = method.compute_loss(
            captioned_batch(method, training_images), torch.Generator().manual_seed(4)
        )
        expected = denoising_loss(
            method.components, latents[:count], text[:count], generator=torch.Generator().manual_seed(4)
        )
    torch.testing.assert_close(instance_only, expected.mean())


def test_dreambooth_class_images_are_generated_once_and_reused(study_cache, trained):
    first = trained("dreambooth", "tiny").method
    folder = first.class_images_dir()
    assert folder.parent == study_cache / "class_images"
    files = sorted(folder.glob("*.png"))
    assert len(files) == first.cfg.method.num_class_images
    stamps = [f.stat().st_mtime_ns for f in files]
    with Image.open(files[0]) as image:
        assert image.size == (RESOLUTION, RESOLUTION)
    second = build_method("dreambooth", "tiny", study_cache)
    assert second.class_images_dir() == folder
    assert [f.stat().st_mtime_ns for f in sorted(folder.glob("*.png"))] == stamps
    assert torch.equal(first.class_latent_mean, second.class_latent_mean)
    # Another model has its own class images.
    assert trained("dreambooth", "tiny_sd21").method.class_images_dir() != folder


def test_dreambooth_config_errors(study_cache):
    from sdsweep.errors import ConfigError

    with pytest.raises(ConfigError, match="data.instance_prompt"):
        build_method("dreambooth", "tiny", study_cache, "data.instance_prompt=null")
    no_class = build_method("dreambooth", "tiny", study_cache, prepare=False)
    no_class.cfg.method.class_prompt = None
    with pytest.raises(ConfigError, match="method.class_prompt"):
        no_class.prepare()


# ---- textual inversion -------------------------------------------------------------------------------------
@pytest.mark.parametrize("model", MODELS)
def test_textual_inversion_changes_only_its_rows(trained, model):
    run = trained("textual_inversion", model)
    method = run.method
    after = method.components.text_encoder.get_input_embeddings().weight
    embedding_name = next(
        f"text_encoder.{name}" for name, p in method.components.text_encoder.named_parameters() if p is after
    )
    assert run.changed() == {embedding_name}
    before = run.before[embedding_name]
    others = torch.ones(len(after), dtype=torch.bool)
    others[method.token_ids] = False
    assert torch.equal(before[others], after[others])
    assert not torch.equal(before[method.token_ids], after[method.token_ids])
    assert not method.uses_frozen_text_encoder()


def test_textual_inversion_captions(study_cache):
    objects = build_method("textual_inversion", "tiny", study_cache)
    assert all("<sks>" in objects.transform_caption("anything") for _ in range(5))
    # In training the template comes from the draw's own seed: the same on any rank, after a resume.
    from sdsweep.data.images import transformed_caption

    def draw(index: int, number: int) -> str:
        return transformed_caption(objects.transform_caption, "anything", 7, index, number)

    assert [draw(3, n) for n in range(20)] == [draw(3, n) for n in range(20)]
    assert len({draw(3, n) for n in range(20)}) > 3  # the templates still vary from draw to draw
    multi = build_method(
        "textual_inversion", "tiny", study_cache, "method.template=none", "method.num_vectors=2"
    )
    assert multi.placeholder_tokens() == ["<sks>", "<sks>_1"]
    assert multi.transform_caption("a photo of sks on red") == "a photo of <sks> <sks>_1 on red"
    assert multi.transform_caption("a red square") == "<sks> <sks>_1 a red square"


def test_textual_inversion_multi_vector_file_loads_as_all_its_tokens(study_cache, tmp_path):
    from sdsweep.models.loading import load_pipeline

    method = build_method("textual_inversion", "tiny", study_cache, "method.num_vectors=2")
    path = method.save(tmp_path)
    pipe = load_pipeline(method.components.source)
    pipe.load_textual_inversion(str(path))
    ids = pipe.tokenizer.convert_tokens_to_ids(["<sks>", "<sks>_1"])
    loaded = pipe.text_encoder.get_input_embeddings().weight[ids]
    torch.testing.assert_close(loaded, method.learned_embeddings())
    assert generate(pipe, "a photo of <sks>").shape == (RESOLUTION, RESOLUTION, 3)


def test_textual_inversion_config_errors(study_cache):
    from sdsweep.errors import ConfigError

    with pytest.raises(ConfigError, match="'photo' already exists"):
        build_method("textual_inversion", "tiny", study_cache, "method.placeholder_token=photo")
    with pytest.raises(ConfigError, match="initializer_token='a photo' is 2 tokens"):
        build_method("textual_inversion", "tiny", study_cache, "method.initializer_token='a photo'")
    # The same placeholder twice on one tokenizer: the second would overwrite the first.
    method = build_method("textual_inversion", "tiny", study_cache)
    from sdsweep.training.methods import get_method

    again = get_method("textual_inversion")(method.cfg, method.components, CPU, cache_dir=study_cache)
    with pytest.raises(ConfigError, match="'<sks>' already exists"):
        again.prepare()


# ---- LoRA --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("model", MODELS)
def test_lora_trains_only_adapter_parameters(trained, model):
    run = trained("lora", model)
    trainable = {id(p) for p in run.method.trainable_parameters()}
    names = [n for n, p in run.method.components.unet.named_parameters() if id(p) in trainable]
    assert names and all(".lora_A." in n or ".lora_B." in n for n in names)
    changed = run.changed()
    assert changed and all(".lora_A." in n or ".lora_B." in n for n in changed)
    assert not any(name.startswith("text_encoder.") for name in changed)


def test_lora_on_the_text_encoder_saves_and_reloads(study_cache, training_images, tmp_path):
    from sdsweep.training.methods import load_trained_pipeline

    method = build_method("lora", "tiny", study_cache, "method.train_text_encoder=true")
    encoder_trainable = [n for n, p in method.components.text_encoder.named_parameters() if p.requires_grad]
    assert encoder_trainable and all("lora_" in n for n in encoder_trainable)
    optimizer = torch.optim.AdamW(method.trainable_parameters(), lr=1e-2)
    loss, _ = method.compute_loss(captioned_batch(method, training_images))
    loss.backward()
    optimizer.step()
    method.set_train_mode(False)
    method.save(tmp_path)
    reloaded = load_trained_pipeline(method.cfg, tmp_path, CPU)
    np.testing.assert_allclose(
        generate(reloaded, "a photo of sks"),
        generate(method.pipeline_for_eval(), "a photo of sks"),
        atol=1e-4,
    )
