"""The interface every fine-tuning method implements, and the shared mechanics they reuse."""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, ClassVar

import torch

from sdsweep.config import Config
from sdsweep.loss import denoising_loss
from sdsweep.models import SDComponents, build_pipeline


class FineTuneMethod(ABC):
    """One way of fine-tuning. The training loop only calls the methods below."""

    name: ClassVar[str]

    def __init__(self, cfg: Config, components: SDComponents, device: torch.device, cache_dir: Path | None = None):
        self.cfg = cfg
        self.components = components
        self.device = device
        self.cache_dir = cache_dir

    # ---- setup ---------------------------------------------------------------------------------
    @abstractmethod
    def prepare(self) -> None:
        """Freeze and unfreeze, add tokens or adapters. Raises ConfigError for impossible options."""

    @abstractmethod
    def trainable_parameters(self) -> list[torch.nn.Parameter]: ...

    def uses_frozen_text_encoder(self) -> bool:
        """True when text embeddings of a caption never change during training (they can be cached)."""
        return not self.cfg.method.train_text_encoder

    def transform_caption(self, caption: str) -> str:
        return caption

    # ---- training ------------------------------------------------------------------------------
    def augment_batch(self, batch: dict[str, Any]) -> dict[str, Any]:
        return batch

    def compute_loss(self, batch: dict[str, Any], generator: torch.Generator | None = None) -> tuple[torch.Tensor, dict]:
        latents = self.latents_of(batch, generator=generator)
        hidden = self.text_embeddings_of(batch)
        per_sample = self.per_sample_loss(latents, hidden, generator)
        loss = per_sample.mean()
        return loss, {"train/loss": loss.detach()}

    def after_optimizer_step(self) -> None:
        pass

    # ---- shared mechanics ------------------------------------------------------------------------
    def per_sample_loss(self, latents, hidden, generator=None) -> torch.Tensor:
        return denoising_loss(
            self.components.unet,
            self.components.noise_scheduler,
            latents,
            hidden,
            generator=generator,
            snr_gamma=self.cfg.train.snr_gamma,
            noise_offset=0.0 if generator is not None else self.cfg.train.noise_offset,
        )

    def latents_of(self, batch: dict[str, Any], prefix: str = "", generator: torch.Generator | None = None) -> torch.Tensor:
        """Cached latents when the batch has them, else the frozen VAE's encoding of the pixels."""
        cached = batch.get(f"{prefix}latents")
        if cached is not None:
            return cached.to(self.device)
        vae = self.components.vae
        pixels = batch[f"{prefix}pixel_values"].to(self.device, dtype=vae.dtype)
        with torch.no_grad():
            distribution = vae.encode(pixels).latent_dist
            # A fixed-seed validation loss must not draw from the global RNG: use the mean then.
            latents = distribution.mode() if generator is not None else distribution.sample()
        return latents * self.components.latent_scaling

    def text_embeddings_of(self, batch: dict[str, Any], prefix: str = "") -> torch.Tensor:
        cached = batch.get(f"{prefix}encoder_hidden_states")
        if cached is not None:
            return cached.to(self.device)
        return self.encode_text(batch[f"{prefix}captions"])

    def encode_text(self, captions: list[str]) -> torch.Tensor:
        tokenizer = self.components.tokenizer
        ids = tokenizer(
            captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
        ).input_ids.to(self.device)
        encoder = self.components.text_encoder
        if encoder.training or any(p.requires_grad for p in encoder.parameters()):
            return encoder(ids, return_dict=False)[0]
        with torch.no_grad():
            return encoder(ids, return_dict=False)[0]

    # ---- outputs ---------------------------------------------------------------------------------
    def pipeline_for_eval(self, scheduler_name: str = "dpmsolver++"):
        return build_pipeline(self.components, scheduler_name, self.device)

    @abstractmethod
    def save(self, out_dir: Path) -> Path:
        """Write the trained weights in the format diffusers users load."""

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {f"p{i}": p.detach().cpu() for i, p in enumerate(self.trainable_parameters())}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for i, parameter in enumerate(self.trainable_parameters()):
                parameter.copy_(state[f"p{i}"].to(parameter.device, parameter.dtype))

    def set_train_mode(self, training: bool) -> None:
        self.components.unet.train(training)


def save_full_pipeline(components: SDComponents, out_dir: Path, unet=None, text_encoder=None) -> Path:
    """A pipeline folder that loads with ``StableDiffusionPipeline.from_pretrained``."""
    from diffusers import StableDiffusionPipeline

    from sdsweep.models import make_inference_scheduler

    pipe = StableDiffusionPipeline(
        unet=unet or components.unet,
        vae=components.vae,
        text_encoder=text_encoder or components.text_encoder,
        tokenizer=components.tokenizer,
        # Saved with the sampler SD checkpoints ship with (PNDM), not the 1000-step training scheduler.
        scheduler=make_inference_scheduler("pndm", components.noise_scheduler.config),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(out_dir, safe_serialization=True)
    return out_dir
