"""The fixed-seed validation loss: the training loss on held-out data, comparable across steps and trials."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch


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
