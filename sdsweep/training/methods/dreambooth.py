"""DreamBooth: a full fine-tune on instance images with one rare-identifier prompt, plus prior preservation.

Prior preservation mixes in "class" images that the frozen base model generated for the class prompt,
so the model keeps knowing what a generic member of the class looks like. They are generated once,
before any training step, and cached under ``<study>/cache/class_images/<key>/``: every trial of a
study (every learning rate, every step count) regularises against the same set.
"""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from sdsweep import io
from sdsweep.config.methods import check_dreambooth_prompts
from sdsweep.config.resolve import resolved_resolution
from sdsweep.data.images import open_rgb
from sdsweep.data.latent_cache import model_content
from sdsweep.models.loading import sampling_precision
from sdsweep.models.versions import POOLED, SIZE_CONDITIONS, PromptEmbeddings
from sdsweep.training.methods.base import Batch, TrainedModules
from sdsweep.training.methods.full import FullFineTune
from sdsweep.training.process_group import process_rank


class DreamBooth(FullFineTune):
    name = "dreambooth"
    class_latent_mean: torch.Tensor | None = None  # set by prepare() with prior preservation

    def prepare(self) -> None:
        self._validate_options()
        self.class_latent_mean = None
        if self.cfg.method.with_prior_preservation:
            # Before super().prepare(): the class images must come from the untouched base model.
            images = self._class_images()
            self.class_latent_mean, self.class_latent_std = self._encode_class_images(images)
            # Data-parallel ranks draw different class images (rank 0 as a single process does).
            self.class_rng = torch.Generator().manual_seed(self.cfg.train.seed + 1_000_003 * process_rank())
            self.class_text_embedding = (
                self.encode_prompts([self.cfg.method.class_prompt])
                if self.uses_frozen_text_encoder()
                else None
            )
        super().prepare()

    def _validate_options(self) -> None:
        check_dreambooth_prompts(self.cfg)  # the config rule; a config edited after compose still fails here

    def transform_caption(self, caption: str, rng: random.Random | None = None) -> str:
        # DreamBooth binds the subject to the identifier by training every image on the same prompt.
        return self.cfg.data.instance_prompt or caption

    # ---- class images ----------------------------------------------------------------------------
    def class_images_dir(self) -> Path:
        """``<cache>/class_images/<key>``; the key covers everything that changes the generated images."""
        eval_cfg = self.cfg.eval
        identity = {
            # What the model holds, not where it is: a moved cache or model reuses its class images.
            "source": model_content(self.cfg, self.components.source, self._content_parts()),
            "class_prompt": self.cfg.method.class_prompt,
            "resolution": resolved_resolution(self.cfg),
            "seed": self.cfg.train.seed,
            "sampler": [eval_cfg.scheduler, eval_cfg.num_inference_steps, eval_cfg.guidance_scale],
        }
        if self.cfg.model.vae_path:  # another VAE decodes other class images (absent otherwise: same keys)
            identity["vae_path"] = self.cfg.model.vae_path
        key = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]
        root = self.cache_dir or io.StudyPaths.of(self.cfg.paths.root, self.cfg.study).cache
        return root / "class_images" / key

    def _content_parts(self) -> tuple[str, ...]:
        """The model folders that shape the class images: every text encoder and tokenizer of the version."""
        version = self.components.version
        return ("unet", "vae", *version.text_encoder_parts, *version.tokenizer_parts, "scheduler")

    def _class_images(self) -> list[Image.Image]:
        folder = self.class_images_dir()
        wanted = self.cfg.method.num_class_images
        # The folder only ever appears complete (written aside, then renamed), so counting suffices.
        if len(list(folder.glob("*.png"))) < wanted:
            # One process generates; the others that want the same images (this run's other data-parallel
            # ranks, other workers of the study) wait for the lock, then read what it wrote.
            with io.file_lock(folder.with_name(f".{folder.name}.lock")):
                if len(list(folder.glob("*.png"))) < wanted:
                    self._generate_class_images(folder, wanted)
        return [open_rgb(path) for path in sorted(folder.glob("*.png"))[:wanted]]

    def _generate_class_images(self, folder: Path, count: int) -> None:
        """Generate ``count`` images with the frozen base model into a staging folder, then swap it in."""
        resolution = resolved_resolution(self.cfg)
        print(f"[sdsweep] dreambooth: generating {count} class images into {folder}", flush=True)
        pipe = self.pipeline_for_eval(self.cfg.eval.scheduler)
        staging = io.staging_dir(folder)
        batch_size = max(1, self.cfg.eval.batch_size)
        for start in range(0, count, batch_size):
            indices = range(start, min(start + batch_size, count))
            # One seed per image index: a larger num_class_images later reproduces the first images.
            generators = [torch.Generator().manual_seed(self.cfg.train.seed * 1_000_003 + i) for i in indices]
            with sampling_precision(self.cfg.eval.dtype, self.device):  # half precision on CUDA
                images = pipe(
                    [self.cfg.method.class_prompt] * len(indices),
                    height=resolution,
                    width=resolution,
                    num_inference_steps=self.cfg.eval.num_inference_steps,
                    guidance_scale=self.cfg.eval.guidance_scale,
                    generator=generators,
                ).images
            for index, image in zip(indices, images):
                image.save(staging / f"{index:05d}.png")
        io.replace_dir(staging, folder)

    @torch.no_grad()
    def _encode_class_images(self, images: list[Image.Image]) -> tuple[torch.Tensor, torch.Tensor]:
        """The VAE latent distribution (mean, std) of every class image, encoded once."""
        resolution = resolved_resolution(self.cfg)
        vae = self.components.vae
        means, stds = [], []
        batch_size = max(1, self.cfg.eval.batch_size)
        for start in range(0, len(images), batch_size):
            pixels = torch.stack([_to_tensor(i, resolution) for i in images[start : start + batch_size]])
            distribution = vae.encode(pixels.to(self.device, vae.dtype)).latent_dist
            means.append(distribution.mean)
            stds.append(distribution.std)
        return torch.cat(means), torch.cat(stds)

    # ---- training --------------------------------------------------------------------------------
    def augment_batch(self, batch: Batch) -> Batch:
        """Append as many class samples as the batch has instance samples (latents + text)."""
        if self.class_latent_mean is None:
            return batch
        size = self.batch_size_of(batch)
        picks = torch.randint(len(self.class_latent_mean), (size,), generator=self.class_rng)
        mean, std = self.class_latent_mean[picks], self.class_latent_std[picks]
        noise = torch.randn(mean.shape, generator=self.class_rng).to(mean.device, mean.dtype)
        extra: Batch = {"class_latents": (mean + std * noise) * self.components.latent_scaling}
        if self.components.version.size_conditioned:
            # Class images were generated at the training resolution: original = target, no crop.
            resolution = resolved_resolution(self.cfg)
            extra[f"class_{SIZE_CONDITIONS}"] = torch.tensor([[resolution, resolution, 0, 0]] * size)
        if self.class_text_embedding is not None:
            text = self.class_text_embedding.expand(size)
            extra["class_encoder_hidden_states"] = text.hidden_states
            if text.pooled is not None:
                extra[f"class_{POOLED}"] = text.pooled
        else:
            extra["class_captions"] = [self.cfg.method.class_prompt] * size
        return {**batch, **extra}

    def compute_loss(
        self,
        batch: Batch,
        generator: torch.Generator | None = None,
        modules: TrainedModules | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Instance mean + prior_loss_weight x class mean; the instance loss alone without class samples."""
        if batch.get("class_latents") is None and batch.get("class_pixel_values") is None:
            return super().compute_loss(batch, generator, modules)
        instance_latents = self.latents_of(batch, generator=generator)
        class_latents = self.latents_of(batch, prefix="class_", generator=generator)
        # One UNet pass (and one text-encoder pass when it trains) over instance + class samples, then
        # the per-sample losses split in two: one forward per backward through a DDP-wrapped module.
        if batch.get("captions") is not None and batch.get("class_captions") is not None:
            text = self.encode_prompts([*batch["captions"], *batch["class_captions"]], modules)
        else:
            text = PromptEmbeddings.cat(
                [
                    self.prompt_embeddings_of(batch, modules=modules),
                    self.prompt_embeddings_of(batch, "class_", modules),
                ]
            )
        latents = torch.cat([instance_latents, class_latents])
        sizes = [batch.get(SIZE_CONDITIONS), batch.get(f"class_{SIZE_CONDITIONS}")]
        sizes = None if any(s is None for s in sizes) else torch.cat([s.cpu() for s in sizes])
        added = self.added_conditions(text, sizes, latents)
        per_sample = self.per_sample_loss(
            latents, text.hidden_states, generator, modules, added_conditions=added
        )
        instance_count = instance_latents.shape[0]
        instance_loss = per_sample[:instance_count].mean()
        prior_loss = per_sample[instance_count:].mean()
        loss = instance_loss + self.cfg.method.prior_loss_weight * prior_loss
        logs = {
            "train/loss": loss.detach(),
            "train/instance_loss": instance_loss.detach(),
            "train/prior_loss": prior_loss.detach(),
        }
        return loss, logs

    def state_dict(self) -> dict[str, torch.Tensor]:
        state = super().state_dict()
        if self.class_latent_mean is not None:
            # A resumed run then draws the same class samples an uninterrupted one would have.
            state["dreambooth.class_rng"] = self.class_rng.get_state()
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        super().load_state_dict(state)
        if self.class_latent_mean is not None and "dreambooth.class_rng" in state:
            self.class_rng.set_state(state["dreambooth.class_rng"])


def _to_tensor(image: Image.Image, resolution: int) -> torch.Tensor:
    """PIL RGB -> [3, H, W] float in [-1, 1], the VAE's input range."""
    if image.size != (resolution, resolution):
        image = image.resize((resolution, resolution), Image.Resampling.BICUBIC)
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()
