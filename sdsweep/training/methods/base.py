"""The interface every fine-tuning method implements, and the mechanics they share.

The training loop, the evaluator and the latent cache only talk to a method through this class; the
layers above ask the method's ``MethodSpec`` (``sdsweep.config.methods``), whose ``trainer`` names the
subclass. docs/architecture.md "Adding a method" lists what a new method takes.
"""

from __future__ import annotations

import random
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch

from sdsweep.config.schema import Config
from sdsweep.models.loading import SDComponents, build_pipeline
from sdsweep.models.tokens import tokenize_prompts
from sdsweep.models.versions import POOLED, SIZE_CONDITIONS, PromptEmbeddings
from sdsweep.training.caption_dropout import zero_dropped
from sdsweep.training.loss import Generators, denoising_loss, randn

Batch = dict[str, Any]
# Batch key set by the training loop: one seed per sample, from (train.seed, step, global sample index).
# Each sample's VAE draw, noise, timestep, noise offset and input perturbation come from a generator
# with its seed, so a sample trains identically whichever batch or data-parallel rank it lands in.
NOISE_SEEDS = "noise_seeds"


@dataclass(frozen=True)
class TrainedModules:
    """The modules whose parameters a method trains (None: that component is frozen).

    ``FineTuneMethod.trained_modules()`` gives the components' own; the training loop prepares them
    with accelerate and hands the prepared ones to ``compute_loss(batch, modules=...)``, so the
    training forward passes go through them (on N ranks a DDP wrapper sharing their parameters: the
    gradient all-reduce runs in buckets while backward runs). Everything else (saving, EMA, evaluation,
    checkpoints, the fixed-seed validation loss) uses the components' own, unwrapped modules.
    """

    unet: torch.nn.Module | None = None
    text_encoder: torch.nn.Module | None = None
    text_encoder_2: torch.nn.Module | None = None  # SDXL's second encoder (LoRA, textual inversion)

    def modules(self) -> list[torch.nn.Module]:
        return [m for m in (self.unet, self.text_encoder, self.text_encoder_2) if m is not None]


def _trains(module: torch.nn.Module) -> bool:
    return any(p.requires_grad for p in module.parameters())


def sample_generators(batch: Batch) -> list[torch.Generator] | None:
    seeds = batch.get(NOISE_SEEDS)
    return None if seeds is None else [torch.Generator().manual_seed(int(s)) for s in seeds]


class FineTuneMethod(ABC):
    """One way of fine-tuning Stable Diffusion.

    Lifecycle: ``__init__`` (cheap) -> ``prepare()`` (validates options, then freezes, adds tokens or
    adapters) -> per step ``augment_batch`` + ``compute_loss`` + ``after_optimizer_step`` ->
    ``pipeline_for_eval`` / ``save``.
    """

    name: ClassVar[str]

    def __init__(
        self, cfg: Config, components: SDComponents, device: torch.device, cache_dir: Path | None = None
    ):
        self.cfg = cfg
        self.components = components
        self.device = torch.device(device)
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None

    @classmethod
    def load_trained(cls, cfg: Config, weights_dir: Path, device: Any, scheduler: str):
        """A pipeline with the weights this method saved, loaded through diffusers' own loaders."""
        raise NotImplementedError(f"{cls.__name__} does not say how its saved weights load")

    @classmethod
    def mark_trainable(cls, unet: torch.nn.Module, text_encoder: torch.nn.Module, footprint: Any) -> None:
        """Set requires_grad on the memory estimate's meta-device modules the way ``prepare()`` does (no
        weights, no data); ``footprint`` is the run's ``TrainingFootprint``. The default trains the UNet,
        and the text encoder with ``method.train_text_encoder``."""
        unet.requires_grad_(True)
        cls.mark_text_encoder(text_encoder, footprint)

    @classmethod
    def mark_text_encoder(cls, text_encoder: torch.nn.Module, footprint: Any) -> None:
        """Set requires_grad on one meta-device text encoder as ``prepare()`` does (SDXL's second encoder
        too). The default trains it whole with ``method.train_text_encoder``."""
        if footprint.train_text_encoder:
            text_encoder.requires_grad_(True)

    # ---- setup -----------------------------------------------------------------------------------
    @abstractmethod
    def prepare(self) -> None:
        """Validate the method options (ConfigError before any work), then freeze/unfreeze and extend."""

    @abstractmethod
    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        """Exactly the parameters the optimizer may change."""

    def trained_modules(self) -> TrainedModules:
        """The components holding ``trainable_parameters()`` (the UNet for full, DreamBooth and LoRA; the
        text encoder for textual inversion and with ``method.train_text_encoder``), unwrapped."""
        unet, text_encoder = self.components.unet, self.components.text_encoder
        second = self.components.text_encoder_2
        return TrainedModules(
            unet=unet if _trains(unet) else None,
            text_encoder=text_encoder if _trains(text_encoder) else None,
            text_encoder_2=second if second is not None and _trains(second) else None,
        )

    def uses_frozen_text_encoder(self) -> bool:
        """True when a caption's text embedding never changes during training, so it can be cached."""
        return not self.cfg.method.train_text_encoder

    def transform_caption(self, caption: str, rng: random.Random | None = None) -> str:
        """The caption the model is trained on for a dataset caption (identity by default). The datasets
        pass ``rng`` seeded by the draw, so a random choice (textual inversion's template) depends only on
        the draw: the same for 1 or N ranks and after a resume."""
        return caption

    # ---- training --------------------------------------------------------------------------------
    def augment_batch(self, batch: Batch) -> Batch:
        """Training-only additions to a batch (DreamBooth's class images); not used for val loss."""
        return batch

    def compute_loss(
        self,
        batch: Batch,
        generator: torch.Generator | None = None,
        modules: TrainedModules | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Mean denoising loss of a batch; with ``generator`` (validation) the noise and timesteps come
        from it, else from the batch's per-sample ``NOISE_SEEDS`` (training), else from the global RNG.
        ``modules``: the prepared trained modules the forward passes go through (the training loop's);
        None calls the components' own."""
        draws = generator if generator is not None else sample_generators(batch)
        latents = self.latents_of(batch, generator=draws)
        text = self.prompt_embeddings_of(batch, modules=modules)
        added = self.added_conditions(text, batch.get(SIZE_CONDITIONS), latents)
        loss = self.per_sample_loss(
            latents, text.hidden_states, draws, modules=modules, added_conditions=added
        ).mean()
        return loss, {"train/loss": loss.detach()}

    def after_optimizer_step(self) -> None:  # noqa: B027 - an optional hook, a no-op by default
        """Hook after each optimizer step (EMA update, embedding-row restore)."""

    def set_train_mode(self, training: bool) -> None:
        """Switch the trained modules between train and eval mode (the loop toggles it around evals)."""
        self.components.unet.train(training)
        if self.cfg.method.train_text_encoder:
            for encoder in self.components.text_encoders:
                encoder.train(training)

    # ---- shared mechanics ------------------------------------------------------------------------
    def per_sample_loss(
        self,
        latents: torch.Tensor,
        text_embeddings: torch.Tensor,
        generator: Generators = None,
        modules: TrainedModules | None = None,
        added_conditions: dict[str, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        # The noise offset (and input perturbation) are training augmentations: a fixed-seed validation
        # loss (one generator) leaves them out so trials with different offsets are scored on the same task.
        validation = isinstance(generator, torch.Generator)
        return denoising_loss(
            self.components,
            latents,
            text_embeddings,
            generator=generator,
            unet=modules.unet if modules is not None else None,
            snr_gamma=self.cfg.train.snr_gamma,
            noise_offset=0.0 if validation else self.cfg.train.noise_offset,
            input_perturbation=0.0 if validation else self.cfg.train.input_perturbation,
            added_cond_kwargs=added_conditions,
        )

    def added_conditions(
        self, text: PromptEmbeddings, size_conditions: torch.Tensor | None, latents: torch.Tensor
    ) -> dict[str, torch.Tensor] | None:
        """The UNet's added conditions the model version asks for (SDXL: pooled text and time_ids from
        each sample's recorded original size and crop, and the size the latents decode to); None for SD."""
        scale = self.components.vae_scale_factor
        target = (int(latents.shape[-2]) * scale, int(latents.shape[-1]) * scale)
        return self.components.version.added_conditions(text, size_conditions, target)

    def latents_of(self, batch: Batch, prefix: str = "", generator: Generators = None) -> torch.Tensor:
        """Scaled latents: the batch's cached ``latents``, else the frozen VAE's encoding of its pixels."""
        cached = batch.get(f"{prefix}latents")
        if cached is not None:
            return cached.to(self.device)
        pixels = batch.get(f"{prefix}pixel_values")
        if pixels is None:
            raise KeyError(
                f"A batch needs '{prefix}pixel_values' or '{prefix}latents'; it has {sorted(batch)}."
            )
        vae = self.components.vae
        with torch.no_grad():
            distribution = vae.encode(pixels.to(self.device, vae.dtype)).latent_dist
            if isinstance(generator, list):  # training with per-sample seeds: sample i from generator i
                xi = randn(tuple(distribution.mean.shape), generator, torch.device("cpu"))
                latents = distribution.mean + distribution.std * xi.to(distribution.mean)
            elif generator is not None:
                # A fixed-seed validation loss must not draw from the global RNG: it scores the mean latent.
                latents = distribution.mode()
            else:
                latents = distribution.sample()
        # A half-precision VAE (on CUDA) feeds the fp32 noise and loss: compute those in fp32.
        return latents.float() * self.components.latent_scaling

    def text_embeddings_of(
        self, batch: Batch, prefix: str = "", modules: TrainedModules | None = None
    ) -> torch.Tensor:
        """The batch's cached ``encoder_hidden_states``, else the text encoder's output for its captions."""
        return self.prompt_embeddings_of(batch, prefix, modules).hidden_states

    def prompt_embeddings_of(
        self, batch: Batch, prefix: str = "", modules: TrainedModules | None = None
    ) -> PromptEmbeddings:
        """The batch's cached embeddings (``encoder_hidden_states``, and ``pooled_text_embeds`` where the
        model version has a pooled one), else the text encoders' output for its captions."""
        cached = batch.get(f"{prefix}encoder_hidden_states")
        pooled = batch.get(f"{prefix}{POOLED}")
        if cached is not None and (pooled is not None or not self.components.version.has_pooled_text):
            return PromptEmbeddings(cached, pooled).to(self.device)
        captions = batch.get(f"{prefix}captions")
        if captions is None:
            raise KeyError(
                f"A batch needs '{prefix}captions' or '{prefix}encoder_hidden_states'; it has {sorted(batch)}."
            )
        return self.encode_prompts(list(captions), modules)

    def encode_text(self, captions: list[str], modules: TrainedModules | None = None) -> torch.Tensor:
        return self.encode_prompts(captions, modules).hidden_states

    def encode_prompts(self, captions: list[str], modules: TrainedModules | None = None) -> PromptEmbeddings:
        """Captions through the model's tokenizers and text encoders, as its pipeline encodes prompts."""
        encoders = self.components.text_encoders
        if modules is not None:  # the prepared (DDP-wrapped) trained encoders
            prepared = [modules.text_encoder, modules.text_encoder_2][: len(encoders)]
            encoders = [p if p is not None else e for p, e in zip(prepared, encoders)]
        ids = [tokenize_prompts(t, captions).to(self.device) for t in self.components.tokenizers]
        version = self.components.version
        if any(p.requires_grad for encoder in encoders for p in encoder.parameters()):
            text = version.encode(encoders, ids)  # trained (or its embedding table is)
        else:
            # A frozen encoder needs no graph; no_grad (not set_grad_enabled) respects a caller's no_grad.
            with torch.no_grad():
                frozen = version.encode(encoders, ids)
            pooled = None if frozen.pooled is None else frozen.pooled.float()
            text = PromptEmbeddings(frozen.hidden_states.float(), pooled)
        return zero_dropped(captions, text) if version.dropped_caption_is_zeros else text

    @staticmethod
    def batch_size_of(batch: Batch) -> int:
        for key in ("latents", "pixel_values", "encoder_hidden_states"):
            if batch.get(key) is not None:
                return int(batch[key].shape[0])
        return len(batch["captions"])

    # ---- outputs ---------------------------------------------------------------------------------
    def pipeline_for_eval(self, scheduler_name: str = "dpmsolver++"):
        """A pipeline sharing the live (trained) modules."""
        return build_pipeline(self.components, scheduler_name, self.device)

    @abstractmethod
    def save(self, out_dir: Path) -> Path:
        """Write the trained weights in the format diffusers users load; returns the written path."""

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Flat tensors (safetensors-compatible) that restore training state with ``load_state_dict``."""
        return {f"param.{i}": p.detach().cpu() for i, p in enumerate(self.trainable_parameters())}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for i, parameter in enumerate(self.trainable_parameters()):
                parameter.copy_(state[f"param.{i}"].to(parameter.device, parameter.dtype))


def save_pipeline_folder(
    components: SDComponents, out_dir: Path, unet: torch.nn.Module | None = None
) -> Path:
    """A folder that loads with the version's pipeline ``from_pretrained`` (safetensors weights)."""
    from sdsweep.models.loading import make_inference_scheduler

    version = components.version
    parts = version.pipeline_parts(components)
    if unet is not None:
        parts["unet"] = unet
    # Saved with the sampler the version's checkpoints ship with (PNDM for SD, Euler for SDXL), not the
    # 1000-step DDPM trainer.
    pipe = version.pipeline_cls()(
        **parts,
        scheduler=make_inference_scheduler(version.saved_scheduler, components.noise_scheduler.config),
    )
    out_dir = Path(out_dir)
    pipe.save_pretrained(out_dir, safe_serialization=True)
    return out_dir
