"""Recipe knobs on the real tiny models: optimizers, zero-terminal SNR, input perturbation, caption
dropout and aspect-ratio buckets, each through training, checkpoint and resume."""

from __future__ import annotations

import json
import math
import pickle
from pathlib import Path

import pytest
import torch
from conftest import TINY_OVERRIDES, compose
from PIL import Image

from sdsweep.config.resolve import resolved_guidance_rescale
from sdsweep.config.validate import validate
from sdsweep.data.buckets import BucketBatchSampler, BucketGrid, nearest_bucket
from sdsweep.data.examples import load_examples, split_examples
from sdsweep.data.latent_cache import ROWS, LatentCache, build_training_dataset
from sdsweep.errors import ConfigError
from sdsweep.models.loading import load_components, make_inference_scheduler
from sdsweep.training.batches import infinite_batches
from sdsweep.training.caption_dropout import CaptionDropout, with_caption_dropout
from sdsweep.training.methods import get_method
from sdsweep.training.train import train

CPU = torch.device("cpu")
# (width, height) of the varied-aspect test set: portrait, landscape, square and one beyond 2:1.
ASPECT_SIZES = [(48, 32), (32, 48), (40, 40), (64, 32), (30, 45), (50, 30), (36, 48), (45, 45)]


@pytest.fixture(scope="module")
def aspect_dir(tmp_path_factory) -> Path:
    """An imagefolder of smooth gradient images of different aspect ratios."""
    folder = tmp_path_factory.mktemp("aspect")
    rows = []
    for number, (width, height) in enumerate(ASPECT_SIZES):
        x = torch.linspace(0, 1, width).expand(height, width)
        y = torch.linspace(0, 1, height).unsqueeze(1).expand(height, width)
        rgb = torch.stack([x, y, (x + y + number / 8) % 1], -1)
        name = f"{number:02d}.png"
        Image.fromarray((rgb * 255).byte().numpy()).save(folder / name)
        rows.append(json.dumps({"file_name": name, "text": f"a gradient number {number}"}))
    (folder / "metadata.jsonl").write_text("\n".join(rows) + "\n")
    return folder


def setup(cache_dir: Path | None, *extra: str):
    """A freshly loaded model and prepared full fine-tune, as a new trial process would build them."""
    cfg = compose(TINY_OVERRIDES + ["method.learning_rate=1e-3", "train.train_batch_size=2", *extra])
    components = load_components(cfg, CPU)
    torch.manual_seed(0)
    method = get_method(cfg.method.name)(cfg, components, CPU, cache_dir)
    method.prepare()
    examples, _ = split_examples(load_examples(cfg), cfg.data.num_heldout)
    return cfg, method, build_training_dataset(cfg, components, method, examples, cache_dir)


def trainable_copy(method) -> list[torch.Tensor]:
    return [p.detach().clone() for p in method.trainable_parameters()]


# ---- config ------------------------------------------------------------------------------------------
def test_optional_optimizers_and_8bit_adam_name_their_package_when_missing():
    pytest.importorskip("prodigyopt")
    assert compose(TINY_OVERRIDES + ["train.optimizer=prodigy"]).train.optimizer == "prodigy"
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        for override in ("train.optimizer=adamw8bit", "method.use_8bit_adam=true"):
            with pytest.raises(
                ConfigError, match="'bitsandbytes' is not installed.*pip install bitsandbytes"
            ):
                compose(TINY_OVERRIDES + [override])
    with pytest.raises(ConfigError, match="train.optimizer.*allowed values"):
        compose(TINY_OVERRIDES + ["train.optimizer=sgd"])
    # A swept optimizer is checked when the sweep is composed, not when its trial starts.
    cfg = compose(TINY_OVERRIDES + ["+sweep=optimizers"])
    assert cfg.sweep.params["train.optimizer"].choices == ["adamw", "lion"]
    cfg.sweep.params["train.optimizer"].choices = ["adamw", "sgd"]
    with pytest.raises(ConfigError, match="sweep.params.train.optimizer.*'sgd'"):
        validate(cfg)


@pytest.mark.parametrize(
    "override, culprit",
    [
        ("train.caption_dropout=1.5", "train.caption_dropout"),
        ("train.input_perturbation=-0.1", "train.input_perturbation"),
        ("eval.guidance_rescale=2", "eval.guidance_rescale"),
        ("train.bucket_max_ratio=0.5", "train.bucket_max_ratio"),
        ("train.bucket_step=0", "train.bucket_step"),
    ],
)
def test_bad_recipe_values_are_config_errors(override, culprit):
    with pytest.raises(ConfigError, match=culprit):
        compose(TINY_OVERRIDES + [override])


def test_zero_terminal_snr_needs_v_prediction_before_weights_load():
    with pytest.raises(ConfigError, match="v-prediction"):
        compose(TINY_OVERRIDES + ["train.zero_terminal_snr=true", "model.prediction_type=epsilon"])
    with pytest.raises(ConfigError, match="PNDM"):
        compose(TINY_OVERRIDES + ["model=tiny_sd21", "train.zero_terminal_snr=true", "eval.scheduler=pndm"])
    # model.prediction_type=auto: the epsilon tiny sd15 is caught when its scheduler config is read.
    cfg = compose(TINY_OVERRIDES + ["train.zero_terminal_snr=true"])
    with pytest.raises(ConfigError, match="predicts epsilon"):
        load_components(cfg, CPU)


# ---- zero-terminal SNR -----------------------------------------------------------------------------------
def test_zero_terminal_snr_has_terminal_alpha_bar_zero_and_a_finite_loss():
    cfg = compose(TINY_OVERRIDES + ["model=tiny_sd21", "train.zero_terminal_snr=true", "train.snr_gamma=5"])
    components = load_components(cfg, CPU)
    alphas_cumprod = components.noise_scheduler.alphas_cumprod
    assert alphas_cumprod[-1].item() == 0.0 and alphas_cumprod[0].item() > 0.99
    assert resolved_guidance_rescale(cfg) == 0.7
    plain = load_components(compose(TINY_OVERRIDES + ["model=tiny_sd21"]), CPU).noise_scheduler
    assert plain.alphas_cumprod[-1].item() > 0  # the stock schedule never reaches pure noise

    from sdsweep.training.loss import diffusion_loss, diffusion_target

    scheduler, last = components.noise_scheduler, cfg.model.resolution
    latents = torch.randn(2, 4, last // 2, last // 2)
    noise = torch.randn_like(latents)
    timesteps = torch.tensor([scheduler.config.num_train_timesteps - 1, 0])
    noisy = scheduler.add_noise(latents, noise, timesteps)
    assert torch.equal(noisy[0], noise[0])  # the last step is pure noise
    hidden = torch.randn(2, 77, components.text_encoder.config.hidden_size)
    with torch.no_grad():
        prediction = components.unet(noisy, timesteps, hidden, return_dict=False)[0]
    target = diffusion_target(scheduler, latents, noise, timesteps)
    assert torch.allclose(target[0], -latents[0])  # v at alpha-bar 0 is minus the clean latent
    for snr_gamma in (None, 5.0):
        loss = diffusion_loss(prediction, target, timesteps, scheduler, snr_gamma, reduction="none")
        assert torch.isfinite(loss).all()

    sampler = make_inference_scheduler("dpmsolver++", plain.config, zero_terminal_snr=True)
    assert sampler.config.timestep_spacing == "trailing" and sampler.config.rescale_betas_zero_snr
    sampler.set_timesteps(4)
    assert int(sampler.timesteps[0]) == scheduler.config.num_train_timesteps - 1


# ---- caption dropout ------------------------------------------------------------------------------------
def test_caption_dropout_drops_the_expected_share_reproducibly(tmp_path):
    cfg, method, dataset = setup(tmp_path / "cache", "train.caption_dropout=0.25")
    wrapped = with_caption_dropout(cfg, method, dataset)
    assert isinstance(wrapped, CaptionDropout)
    keys = [(index, draw) for draw in range(100) for index in range(len(dataset))]
    dropped = [key for key in keys if wrapped[key]["caption"] == ""]
    share = len(dropped) / len(keys)
    assert abs(share - 0.25) < 0.04, share  # 800 draws: 3.1 standard deviations
    again = with_caption_dropout(cfg, method, dataset)
    assert [key for key in keys if again.dropped(key)] == dropped  # the same seed drops the same draws
    empty = method.encode_text([""])[0]
    item = wrapped[dropped[0]]
    assert torch.allclose(item["encoder_hidden_states"], empty)  # the cached text became the empty one
    kept = next(key for key in keys if key not in set(dropped))
    assert wrapped[kept]["caption"] == dataset[kept]["caption"] != ""
    other_seed = with_caption_dropout(
        compose(TINY_OVERRIDES + ["train.caption_dropout=0.25", "train.seed=1"]), method, dataset
    )
    assert [key for key in keys if other_seed.dropped(key)] != dropped


@pytest.mark.parametrize("model, zeros", [("tiny", False), ("tiny_sdxl", True)])
def test_a_dropped_caption_conditions_on_the_branch_guidance_subtracts(tmp_path, model, zeros):
    """SD encodes the empty prompt for it; SDXL's pipeline uses zeros (force_zeros_for_empty_prompt), so a
    dropped caption trains zeros there, cached or encoded live, and an image's own empty caption does not."""
    from sdsweep.training.caption_dropout import DroppedCaption

    cfg, method, dataset = setup(tmp_path / "cache", f"model={model}", "train.caption_dropout=0.5")
    assert method.components.version.dropped_caption_is_zeros is zeros
    assert DroppedCaption() == "" and method.encode_text([DroppedCaption()]).shape[0] == 1
    assert isinstance(pickle.loads(pickle.dumps(DroppedCaption())), DroppedCaption)  # DataLoader workers
    live = method.encode_prompts([DroppedCaption(), "", "a red square"])
    empty = method.encode_prompts([""])
    assert torch.equal(live.hidden_states[1], empty.hidden_states[0])  # a real empty caption is encoded
    assert torch.count_nonzero(live.hidden_states[2]) > 0
    dropped_row = live.hidden_states[0]
    assert bool(torch.count_nonzero(dropped_row) == 0) is zeros
    assert zeros or torch.equal(dropped_row, empty.hidden_states[0])
    if zeros:
        assert torch.count_nonzero(live.pooled[0]) == 0 and torch.count_nonzero(live.pooled[1]) > 0
    wrapped = with_caption_dropout(cfg, method, dataset)
    key = next(k for k in ((i, d) for d in range(20) for i in range(len(dataset))) if wrapped.dropped(k))
    item = wrapped[key]
    assert isinstance(item["caption"], DroppedCaption)
    assert bool(torch.count_nonzero(item["encoder_hidden_states"]) == 0) is zeros  # the cached path agrees
    if zeros:
        assert torch.count_nonzero(item["pooled_text_embeds"]) == 0


# ---- buckets ------------------------------------------------------------------------------------------
def test_bucket_grid_keeps_aspect_ratio_and_area():
    sd = BucketGrid(resolution=512, step=64, min_side=256, max_side=1024, max_ratio=2.0)
    assert sd.buckets() == [(384, 640), (448, 576), (512, 512), (576, 448), (640, 384)]
    tiny = BucketGrid(resolution=32, step=4, min_side=16, max_side=64, max_ratio=2.0)
    buckets = tiny.buckets()
    assert (32, 32) in buckets and all(w * h <= 32 * 32 and w % 4 == h % 4 == 0 for w, h in buckets)
    for width, height in [(300, 200), (200, 300), (100, 100), (160, 90), (90, 120)]:
        w, h = nearest_bucket(width, height, buckets)
        assert abs(math.log((w / h) / (width / height))) < 0.12, (width, height, w, h)


def test_bucket_batches_have_one_shape_and_resume_at_any_batch(tmp_path, aspect_dir):
    cfg, method, dataset = setup(
        tmp_path / "cache", "data=imagefolder", f"data.path={aspect_dir}", "train.bucketing=true"
    )
    shapes = {tuple(item["latents"].shape) for item in (dataset[i] for i in range(len(dataset)))}
    assert len(shapes) >= 3  # portrait, square and landscape buckets
    cache_file = next((tmp_path / "cache" / "latents").glob("*.safetensors"))
    from safetensors.torch import load_file

    assert len([key for key in load_file(str(cache_file)) if key.startswith(ROWS)]) == len(shapes)
    batches = infinite_batches(dataset, 2, seed=0)
    drawn = [next(batches) for _ in range(12)]
    for batch in drawn:
        assert batch["latents"].shape[0] == 2
    assert len({tuple(b["latents"].shape) for b in drawn}) >= 2
    resumed = infinite_batches(dataset, 2, seed=0, skip=5 * 2)
    for expected in drawn[5:]:
        assert torch.equal(next(resumed)["latents"], expected["latents"])
    sampler = BucketBatchSampler(dataset.bucket_ids, 2, seed=0)
    first_epoch = [i for batch in sampler.epoch_batches(0) for i, _ in batch]
    assert set(first_epoch) == set(range(len(dataset)))  # every image trains each epoch
    # The pixel path (no cache) uses the same buckets.
    _, _, pixels = setup(None, "data=imagefolder", f"data.path={aspect_dir}", "train.bucketing=true")
    for index in range(len(dataset)):  # the tiny VAE halves each side
        latent_size = tuple(2 * side for side in dataset[index]["latents"].shape[-2:])
        assert tuple(pixels[index]["pixel_values"].shape[-2:]) == latent_size


# ---- every option trains, checkpoints and resumes exactly --------------------------------------------------
RESUMABLE_OPTIONS = {
    "prodigy": ["train.optimizer=prodigy", "method.learning_rate=1.0"],
    "lion": ["train.optimizer=lion", "method.learning_rate=1e-4"],
    "zero_terminal_snr": ["model=tiny_sd21", "train.zero_terminal_snr=true"],
    "input_perturbation": ["train.input_perturbation=0.1", "train.noise_offset=0.05"],
    "caption_dropout": ["train.caption_dropout=0.5"],
    "bucketing": ["data=imagefolder", "train.bucketing=true"],
}


@pytest.mark.slow
@pytest.mark.parametrize("option", sorted(RESUMABLE_OPTIONS))
def test_each_option_trains_and_resumes_like_an_uninterrupted_run(tmp_path, aspect_dir, option):
    extra = list(RESUMABLE_OPTIONS[option])
    if option == "bucketing":
        extra.append(f"data.path={aspect_dir}")  # batches of 2 from one bucket each
    else:
        extra.append("train.train_batch_size=1")  # cheaper; the option does not depend on it
    cfg, method, dataset = setup(tmp_path / "cache", *extra)
    before = trainable_copy(method)
    losses: list[float] = []
    from sdsweep.training.train import TrainHooks

    hooks = TrainHooks(on_step=lambda step, logs: losses.append(logs["train/loss"]))
    train(cfg, method, dataset, [1, 2], hooks, tmp_path / "straight")
    expected = trainable_copy(method)
    assert all(math.isfinite(v) for v in losses)
    assert any(not torch.equal(a, b) for a, b in zip(before, expected, strict=True))  # it did train

    cfg, method, dataset = setup(tmp_path / "cache", *extra)
    resumed_losses: list[float] = []
    hooks = TrainHooks(on_step=lambda step, logs: resumed_losses.append(logs["train/loss"]))
    train(cfg, method, dataset, [1], hooks, tmp_path / "resumed")
    cfg, method, dataset = setup(tmp_path / "cache", *extra)  # a new process: fresh weights
    train(cfg, method, dataset, [2], hooks, tmp_path / "resumed")
    assert resumed_losses == losses
    for resumed, uninterrupted in zip(trainable_copy(method), expected, strict=True):
        assert torch.equal(resumed, uninterrupted)
    if option == "prodigy":  # Prodigy's own state (step-size estimate, its running sums) was saved
        state = torch.load(tmp_path / "resumed" / "step-2" / "optimizer.pt", weights_only=True)["optimizer"]
        assert {"d", "d_numerator", "d0"} <= set(state["param_groups"][0])
        assert {"s", "p0"} <= set(next(iter(state["state"].values())))


def test_latent_cache_counts_one_encode_per_bucket_chunk(tmp_path, aspect_dir):
    before = LatentCache.encode_calls
    setup(tmp_path / "cache", "data=imagefolder", f"data.path={aspect_dir}", "train.bucketing=true")
    first = LatentCache.encode_calls - before
    setup(tmp_path / "cache", "data=imagefolder", f"data.path={aspect_dir}", "train.bucketing=true")
    assert first > 0 and LatentCache.encode_calls - before == first  # the second build read the file


def test_a_checkpoint_from_before_the_recipe_keys_still_resumes(tmp_path):
    import json as json_module

    from sdsweep.training.checkpoints import TRAINING_STATE, check_resumable

    cfg, method, dataset = setup(tmp_path / "cache", "train.train_batch_size=1")
    train(cfg, method, dataset, [1], checkpoint_dir=tmp_path / "run")
    state_file = tmp_path / "run" / "step-1" / TRAINING_STATE
    state = json_module.loads(state_file.read_text())
    for key in ("train.optimizer", "train.caption_dropout", "train.bucketing"):
        del state["config"][key]  # as written by sdsweep before these keys existed
    state_file.write_text(json_module.dumps(state))
    check_resumable(tmp_path / "run" / "step-1", cfg)  # defaults: the same training
    changed = compose(
        TINY_OVERRIDES
        + ["train.train_batch_size=1", "train.caption_dropout=0.1", "method.learning_rate=1e-3"]
    )
    with pytest.raises(ValueError, match=r"train.caption_dropout: None -> 0.1"):
        check_resumable(tmp_path / "run" / "step-1", changed)


@pytest.mark.slow
def test_a_sweep_over_the_optimizer_runs_each_choice_end_to_end(tmp_path):
    """A categorical train.* parameter goes through the grid, into each trial's saved config."""
    import pandas as pd

    from sdsweep.sweep.driver import run_sweep

    outcome = run_sweep(
        TINY_OVERRIDES
        + [
            "+sweep=optimizers",
            "sweep.learning_rates=[1e-4]",
            "sweep.steps=[1]",
            "sweep.isolation=inprocess",
            "sweep.build_report=false",
            "eval.baseline=false",
            "study=optimizers",
            f"paths.root={tmp_path}",
        ]
    )
    assert outcome.finished and outcome.states.get("COMPLETE") == 2, outcome.states
    saved = sorted(
        compose_saved.read_text().split("optimizer: ", 1)[1].split()[0]
        for compose_saved in (outcome.study_dir / "trials").glob("*/config.yaml")
    )
    assert saved == ["adamw", "lion"]
    assert len(pd.read_csv(outcome.results_csv)) == 2
