"""The diffusion training loss.

clean latents -> add noise at a random timestep -> UNet -> compare with the epsilon or velocity
target -> (min-SNR-weighted) MSE. The target follows the model's scheduler: SD 2.1 (768 px)
predicts v, and training it on an epsilon target would silently wreck it, so an unknown
prediction type is an error rather than a fallback.

``diffusion_target`` and ``diffusion_loss`` are pure functions of tensors; ``denoising_loss`` is the
one step every method shares, given the model components.
"""

from __future__ import annotations

from contextlib import contextmanager
from contextvars import ContextVar
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from sdsweep.models.loading import SDComponents

REDUCTIONS = ("mean", "none")


def diffusion_target(
    noise_scheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor
) -> torch.Tensor:
    """What the UNet should predict: the noise (epsilon) or the velocity (v_prediction)."""
    prediction_type = noise_scheduler.config.prediction_type
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        return noise_scheduler.get_velocity(latents, noise, timesteps)
    raise ValueError(
        f"Unsupported prediction_type {prediction_type!r} in the model's noise scheduler: sdsweep trains "
        "epsilon and v_prediction models. Set model.prediction_type=epsilon or v_prediction if the "
        "scheduler config of this checkpoint is wrong."
    )


def min_snr_weights(noise_scheduler, timesteps: torch.Tensor, snr_gamma: float) -> torch.Tensor:
    """Per-sample min-SNR-gamma weights (Hang et al. 2023) for the loss on the model's own target.

    The paper's weight min(snr, gamma) / snr applies to an epsilon loss. The MSE on a v-target is
    (snr + 1) times the epsilon MSE, so v-models divide by snr + 1 to get the same effective weighting.
    """
    from diffusers.training_utils import compute_snr

    snr = compute_snr(noise_scheduler, timesteps)
    clipped = torch.clamp(snr, max=snr_gamma)
    if noise_scheduler.config.prediction_type == "v_prediction":
        return clipped / (snr + 1)
    return clipped / snr


def diffusion_loss(
    model_pred: torch.Tensor,
    target: torch.Tensor,
    timesteps: torch.Tensor,
    noise_scheduler,
    snr_gamma: float | None = None,
    reduction: str = "mean",
) -> torch.Tensor:
    """MSE between prediction and target, optionally min-SNR weighted.

    ``reduction="none"`` returns one loss per sample (DreamBooth averages instance and class halves
    separately); ``"mean"`` their mean. Computed in float32 so mixed-precision runs do not lose it.
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction={reduction!r} is not supported; use one of {REDUCTIONS}.")
    per_sample = F.mse_loss(model_pred.float(), target.float(), reduction="none")
    per_sample = per_sample.mean(dim=tuple(range(1, per_sample.ndim)))
    if snr_gamma is not None:
        weights = min_snr_weights(noise_scheduler, timesteps, snr_gamma)
        per_sample = per_sample * weights.to(per_sample.device, per_sample.dtype)
    return per_sample if reduction == "none" else per_sample.mean()


Generators = torch.Generator | list[torch.Generator] | None


def randn(shape: tuple[int, ...], generator: Generators, device: torch.device) -> torch.Tensor:
    """``torch.randn``; with one generator per sample (a list), row i comes from generator i, so a
    sample's draw does not depend on which batch or rank it lands in (data-parallel equivalence)."""
    if isinstance(generator, list):
        return torch.cat([torch.randn((1, *shape[1:]), generator=g, device=device) for g in generator])
    return torch.randn(shape, generator=generator, device=device)


def randint(high: int, size: int, generator: Generators, device: torch.device) -> torch.Tensor:
    if isinstance(generator, list):
        return torch.cat([torch.randint(0, high, (1,), generator=g, device=device) for g in generator])
    return torch.randint(0, high, (size,), generator=generator, device=device)


# The validation loss by noise level draws its timesteps from one band [lo, hi]. A context variable carries
# the band to the one place timesteps are drawn, instead of a parameter threaded through every method's
# compute_loss; training never sets it.
_TIMESTEP_BAND: ContextVar[tuple[int, int] | None] = ContextVar("timestep_band", default=None)


@contextmanager
def timestep_band(lo: int, hi: int):
    """Within the block, every drawn timestep is uniform on [lo, hi] (inclusive) instead of the whole range."""
    token = _TIMESTEP_BAND.set((int(lo), int(hi)))
    try:
        yield
    finally:
        _TIMESTEP_BAND.reset(token)


def sample_noise_and_timesteps(
    latents: torch.Tensor,
    num_train_timesteps: int,
    generator: Generators = None,
    noise_offset: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gaussian noise shaped like ``latents`` and one uniform timestep per sample.

    With a generator (or one per sample) every draw comes from it, on the CPU, so a fixed seed gives
    the same noise on any device (the fixed-seed validation loss is then comparable across steps,
    trials and machines; training noise is the same for 1 or N data-parallel ranks).
    """
    draw_device = torch.device("cpu") if generator is not None else latents.device
    batch, channels = latents.shape[0], latents.shape[1]
    noise = randn(tuple(latents.shape), generator, draw_device)
    band = _TIMESTEP_BAND.get()
    if band is None:
        timesteps = randint(num_train_timesteps, batch, generator, draw_device)
    else:
        timesteps = band[0] + randint(band[1] - band[0] + 1, batch, generator, draw_device)
    if noise_offset:
        # A per-channel constant shift lets the model learn to change overall brightness (very dark or
        # bright images), which zero-mean noise never asks of it.
        offset = randn((batch, channels, 1, 1), generator, draw_device)
        noise = noise + noise_offset * offset
    return noise.to(latents.device, latents.dtype), timesteps.to(latents.device)


def denoising_loss(
    components: SDComponents,
    latents: torch.Tensor,
    encoder_hidden_states: torch.Tensor,
    generator: Generators = None,
    snr_gamma: float | None = None,
    noise_offset: float = 0.0,
    input_perturbation: float = 0.0,
    unet: torch.nn.Module | None = None,
    added_cond_kwargs: dict[str, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Per-sample loss of one denoising step from clean (scaled) latents and text embeddings.

    ``unet``: the module to call instead of ``components.unet`` (the training loop's prepared one, a DDP
    wrapper of the same UNet on N ranks).

    ``input_perturbation`` (Ning et al. 2023) noises the UNet's input with ``noise + gamma * xi`` but
    keeps the target built from ``noise``, so the model learns to correct slightly wrong inputs, as it
    meets them when sampling (exposure bias).

    ``added_cond_kwargs``: the UNet's added conditions where the model version has them (SDXL's pooled
    text embedding and time_ids, from ``ModelVersion.added_conditions``); None for SD 1.x/2.x.
    """
    scheduler = components.noise_scheduler
    noise, timesteps = sample_noise_and_timesteps(
        latents, scheduler.config.num_train_timesteps, generator, noise_offset
    )
    input_noise = noise
    if input_perturbation:
        draw_device = torch.device("cpu") if generator is not None else latents.device
        xi = randn(tuple(latents.shape), generator, draw_device)
        input_noise = noise + input_perturbation * xi.to(latents.device, latents.dtype)
    noisy_latents = scheduler.add_noise(latents, input_noise, timesteps)
    unet = components.unet if unet is None else unet
    model_pred = unet(
        noisy_latents,
        timesteps,
        encoder_hidden_states,
        added_cond_kwargs=added_cond_kwargs,
        return_dict=False,
    )[0]
    target = diffusion_target(scheduler, latents, noise, timesteps)
    return diffusion_loss(model_pred, target, timesteps, scheduler, snr_gamma, reduction="none")
