"""The diffusion training loss, as pure functions.

encode -> add noise -> UNet -> epsilon or velocity target -> (SNR-weighted) MSE. The target follows the
model's scheduler: SD 2.1 (768 px) predicts v, and training it on an epsilon target would silently
wreck it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def diffusion_target(noise_scheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    prediction_type = noise_scheduler.config.prediction_type
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        return noise_scheduler.get_velocity(latents, noise, timesteps)
    raise ValueError(
        f"Unsupported prediction_type {prediction_type!r} in the model's scheduler; "
        "sdsweep trains epsilon and v_prediction models (set model.prediction_type to override)."
    )


def snr_weights(noise_scheduler, timesteps: torch.Tensor, snr_gamma: float) -> torch.Tensor:
    """Min-SNR-gamma weights (Hang et al. 2023), for the loss on the model's own target."""
    from diffusers.training_utils import compute_snr

    snr = compute_snr(noise_scheduler, timesteps)
    clipped = torch.clamp(snr, max=snr_gamma)
    if noise_scheduler.config.prediction_type == "v_prediction":
        # The v-target's MSE equals (snr + 1) x the epsilon MSE, so divide by snr + 1, not snr.
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
    """MSE between prediction and target; per-sample with ``reduction="none"`` (DreamBooth splits it)."""
    per_sample = F.mse_loss(model_pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
    if snr_gamma is not None:
        per_sample = per_sample * snr_weights(noise_scheduler, timesteps, snr_gamma).to(per_sample.device)
    if reduction == "none":
        return per_sample
    return per_sample.mean()


def sample_noise(
    latents: torch.Tensor, num_train_timesteps: int, generator: torch.Generator | None = None, noise_offset: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Noise and timesteps; drawn from ``generator`` (on CPU, for reproducibility) when given."""
    shape, batch = latents.shape, latents.shape[0]
    noise = torch.randn(shape, generator=generator, device="cpu" if generator is not None else latents.device)
    timesteps = torch.randint(
        0, num_train_timesteps, (batch,), generator=generator, device="cpu" if generator is not None else latents.device
    )
    if noise_offset:
        # A per-channel constant shift teaches the model to change overall brightness (dark/bright images).
        offset = torch.randn((batch, shape[1], 1, 1), generator=generator, device=noise.device)
        noise = noise + noise_offset * offset
    return noise.to(latents.device, latents.dtype), timesteps.to(latents.device)


def denoising_loss(
    unet,
    noise_scheduler,
    latents: torch.Tensor,
    encoder_hidden_states: torch.Tensor,
    generator: torch.Generator | None = None,
    snr_gamma: float | None = None,
    noise_offset: float = 0.0,
) -> torch.Tensor:
    """The canonical SD step from clean latents to a per-sample loss."""
    noise, timesteps = sample_noise(latents, noise_scheduler.config.num_train_timesteps, generator, noise_offset)
    noisy = noise_scheduler.add_noise(latents, noise, timesteps)
    model_pred = unet(noisy, timesteps, encoder_hidden_states, return_dict=False)[0]
    target = diffusion_target(noise_scheduler, latents, noise, timesteps)
    return diffusion_loss(model_pred, target, timesteps, noise_scheduler, snr_gamma, reduction="none")
