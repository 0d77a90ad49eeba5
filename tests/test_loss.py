"""The diffusion loss on the real tiny SD-1.5 (epsilon) and SD-2.1 (v-prediction) schedulers and UNets."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_OVERRIDES, compose

MODELS = ["tiny", "tiny_sd21"]


@pytest.fixture(scope="module")
def components():
    """{model name: SDComponents}; the loss never changes the modules, so one load per model suffices."""
    from sdsweep.models.loading import load_components

    return {
        model: load_components(compose(TINY_OVERRIDES + [f"model={model}"]), torch.device("cpu"))
        for model in MODELS
    }


def random_latents(batch: int = 4, seed: int = 0) -> torch.Tensor:
    return torch.randn((batch, 4, 16, 16), generator=torch.Generator().manual_seed(seed))


def manual_snr(noise_scheduler, timesteps: torch.Tensor) -> torch.Tensor:
    """SNR from the definition alpha_bar / (1 - alpha_bar), independent of diffusers' compute_snr."""
    alpha_bar = noise_scheduler.alphas_cumprod.double()[timesteps]
    return (alpha_bar / (1 - alpha_bar)).float()


def test_tiny_models_have_the_expected_prediction_types(components):
    assert components["tiny"].noise_scheduler.config.prediction_type == "epsilon"
    assert components["tiny_sd21"].noise_scheduler.config.prediction_type == "v_prediction"


@pytest.mark.parametrize("model", MODELS)
def test_target_follows_the_prediction_type(components, model):
    from sdsweep.training.loss import diffusion_target

    scheduler = components[model].noise_scheduler
    latents, noise = random_latents(seed=1), random_latents(seed=2)
    timesteps = torch.tensor([1, 250, 500, 999])
    target = diffusion_target(scheduler, latents, noise, timesteps)
    velocity = scheduler.get_velocity(latents, noise, timesteps)
    if scheduler.config.prediction_type == "v_prediction":
        torch.testing.assert_close(target, velocity)
        assert not torch.allclose(target, noise)
    else:
        assert torch.equal(target, noise)
        assert not torch.allclose(target, velocity)


def test_unknown_prediction_type_is_an_error(components):
    from sdsweep.training.loss import diffusion_target

    scheduler = copy.deepcopy(components["tiny"].noise_scheduler)
    scheduler.register_to_config(prediction_type="sample")
    with pytest.raises(ValueError, match="prediction_type 'sample'"):
        diffusion_target(scheduler, random_latents(), random_latents(seed=1), torch.tensor([1, 2, 3, 4]))


@pytest.mark.parametrize("model", MODELS)
def test_unweighted_loss_is_the_mse_per_sample_and_its_mean(components, model):
    from sdsweep.training.loss import diffusion_loss

    scheduler = components[model].noise_scheduler
    prediction, target = random_latents(seed=3), random_latents(seed=4)
    timesteps = torch.tensor([10, 200, 600, 900])
    per_sample = diffusion_loss(prediction, target, timesteps, scheduler, reduction="none")
    expected = ((prediction - target) ** 2).flatten(1).mean(dim=1)
    torch.testing.assert_close(per_sample, expected)
    torch.testing.assert_close(
        diffusion_loss(prediction, target, timesteps, scheduler), F.mse_loss(prediction, target)
    )
    with pytest.raises(ValueError, match="reduction='sum'"):
        diffusion_loss(prediction, target, timesteps, scheduler, reduction="sum")


@pytest.mark.parametrize("model", MODELS)
def test_min_snr_weighting_matches_the_paper_for_the_prediction_type(components, model):
    from sdsweep.training.loss import diffusion_loss

    scheduler = components[model].noise_scheduler
    prediction, target = random_latents(seed=5), random_latents(seed=6)
    # Low timesteps have SNR far above gamma (clipped), high ones far below it (weight ~1 for epsilon).
    timesteps = torch.tensor([5, 100, 500, 990])
    gamma = 5.0
    snr = manual_snr(scheduler, timesteps)
    assert snr.max() > gamma > snr.min()  # both regimes are exercised
    denominator = snr + 1 if scheduler.config.prediction_type == "v_prediction" else snr
    weights = torch.clamp(snr, max=gamma) / denominator
    unweighted = diffusion_loss(prediction, target, timesteps, scheduler, reduction="none")
    weighted = diffusion_loss(prediction, target, timesteps, scheduler, snr_gamma=gamma, reduction="none")
    torch.testing.assert_close(weighted, unweighted * weights, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(
        diffusion_loss(prediction, target, timesteps, scheduler, snr_gamma=gamma), weighted.mean()
    )


@pytest.mark.parametrize("model", MODELS)
def test_denoising_loss_trains_the_unet_on_the_scheduler_target(components, model):
    """Reproduce the shared step by hand: same draws, the UNet's prediction, the right target."""
    from sdsweep.training.loss import denoising_loss, sample_noise_and_timesteps

    parts = components[model]
    scheduler = parts.noise_scheduler
    latents = random_latents(batch=2, seed=7)
    text = torch.randn((2, 77, 32), generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        loss = denoising_loss(parts, latents, text, generator=torch.Generator().manual_seed(42))
        noise, timesteps = sample_noise_and_timesteps(
            latents, scheduler.config.num_train_timesteps, torch.Generator().manual_seed(42)
        )
        noisy = scheduler.add_noise(latents, noise, timesteps)
        prediction = parts.unet(noisy, timesteps, text).sample
    velocity = scheduler.get_velocity(latents, noise, timesteps)
    expected_target = velocity if model == "tiny_sd21" else noise
    wrong_target = noise if model == "tiny_sd21" else velocity
    assert loss.shape == (2,)
    torch.testing.assert_close(loss, ((prediction - expected_target) ** 2).flatten(1).mean(1))
    assert not torch.allclose(loss, ((prediction - wrong_target) ** 2).flatten(1).mean(1))


def test_denoising_loss_is_reproducible_with_a_generator(components):
    from sdsweep.training.loss import denoising_loss

    parts = components["tiny"]
    latents = random_latents(batch=2, seed=9)
    text = torch.randn((2, 77, 32), generator=torch.Generator().manual_seed(10))

    def loss(seed: int, **kwargs) -> torch.Tensor:
        with torch.no_grad():
            return denoising_loss(
                parts, latents, text, generator=torch.Generator().manual_seed(seed), **kwargs
            )

    assert torch.equal(loss(0), loss(0))
    assert not torch.equal(loss(0), loss(1))
    # The offset shifts the noise per channel, so the same seed gives a different loss.
    assert not torch.allclose(loss(0), loss(0, noise_offset=0.1))
    assert torch.equal(loss(0, noise_offset=0.1), loss(0, noise_offset=0.1))


def test_input_perturbation_noises_the_unet_input_but_not_the_target(components):
    from sdsweep.training.loss import denoising_loss, sample_noise_and_timesteps

    parts = components["tiny"]
    latents = random_latents(batch=2, seed=3)
    text = torch.randn((2, 77, 32), generator=torch.Generator().manual_seed(4))
    seen: list[torch.Tensor] = []
    hook = parts.unet.register_forward_pre_hook(lambda module, args: seen.append(args[0].clone()))
    try:
        with torch.no_grad():
            plain = denoising_loss(parts, latents, text, generator=torch.Generator().manual_seed(5))
            perturbed = denoising_loss(
                parts, latents, text, generator=torch.Generator().manual_seed(5), input_perturbation=0.1
            )
    finally:
        hook.remove()
    assert not torch.allclose(plain, perturbed)
    # Rebuild what the UNet should have seen: noise + 0.1 * xi, xi drawn right after noise and timesteps.
    generator = torch.Generator().manual_seed(5)
    noise, timesteps = sample_noise_and_timesteps(latents, 1000, generator)
    xi = torch.randn(latents.shape, generator=generator)
    scheduler = parts.noise_scheduler
    torch.testing.assert_close(seen[0], scheduler.add_noise(latents, noise, timesteps))
    torch.testing.assert_close(seen[1], scheduler.add_noise(latents, noise + 0.1 * xi, timesteps))
