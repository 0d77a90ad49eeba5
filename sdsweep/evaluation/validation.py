"""The fixed-seed validation loss: the training loss on held-out data, comparable across steps and trials.

``eval/val_loss`` averages the loss over ``timesteps`` fixed draws of noise and timestep. The loss at a
high-noise timestep and at a low-noise one can differ by orders of magnitude (epsilon prediction is
hardest at little noise), so that one average mostly reports the bands where the loss is largest. ``eval/val_loss/t<lo>-<hi>`` (SimpleTuner's and OneTrainer's per-band validation)
repeats the same fixed draws with the timestep confined to one band of the schedule: where in the noise
range a fine-tune learned, or broke, what it knew.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from sdsweep.training.loss import timestep_band


def band_edges(num_train_timesteps: int, bands: int) -> list[tuple[int, int]]:
    """``bands`` equal, inclusive timestep ranges: 5 over 1000 gives (0, 199) ... (800, 999)."""
    if bands <= 0:
        return []
    edges = [round(i * num_train_timesteps / bands) for i in range(bands + 1)]
    return [(edges[i], edges[i + 1] - 1) for i in range(bands) if edges[i + 1] > edges[i]]


def band_key(lo: int, hi: int) -> str:
    return f"eval/val_loss/t{lo}-{hi}"


@torch.no_grad()
def validation_loss(method, batch: dict[str, Any], seed: int, timesteps: int) -> float:
    """Mean loss over ``timesteps`` fixed draws of noise and timesteps: comparable across steps and trials."""
    losses = []
    cuda_devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    # The global RNG is also seeded (inside a fork, so training's random stream is untouched): any draw a
    # method makes without the generator (e.g. the VAE's latent_dist.sample()) must not change the score.
    with torch.random.fork_rng(devices=cuda_devices):
        for k in range(timesteps):
            torch.manual_seed(seed + k)
            loss, _ = method.compute_loss(batch, generator=torch.Generator().manual_seed(seed + k))
            losses.append(float(loss.detach().float().cpu()))
    return float(np.mean(losses))


def validation_loss_by_band(method, batch: dict[str, Any], seed: int, timesteps: int, bands: int) -> dict:
    """{``eval/val_loss/t<lo>-<hi>``: loss}: the same fixed draws per band, timesteps confined to the band."""
    total = int(method.components.noise_scheduler.config.num_train_timesteps)
    out = {}
    for lo, hi in band_edges(total, bands):
        with timestep_band(lo, hi):
            out[band_key(lo, hi)] = validation_loss(method, batch, seed, timesteps)
    return out
