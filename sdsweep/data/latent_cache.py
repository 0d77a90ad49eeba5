"""A latent and text-embedding cache shared by every trial of a study.

The frozen VAE gives the same latent distribution for the same image in every trial, so a study
encodes its dataset once (both flips when flipping is on) and every trial samples from the stored
distribution. We store the distribution's parameters (mean and log-variance, diffusers'
``latent_dist.parameters``) rather than its mean: the published training scripts sample a fresh
latent every step, and that VAE noise is a (mild) augmentation a cached run should keep.

The file name is a hash of everything that changes the result (image bytes, captions, the content of
the model's VAE and text encoder, revision, resolution, crop and flip settings, VAE dtype), never of a
path, so a stale cache is never read and a moved study (or the same model at another path) reuses its
latents; files are written atomically, so trials running side by side at worst encode twice.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
from pathlib import Path
from typing import Any, ClassVar

import torch

from sdsweep import io
from sdsweep.config.resolve import resolved_resolution
from sdsweep.config.schema import Config
from sdsweep.content import folder_identity
from sdsweep.data.buckets import BucketedImageDataset, assign_buckets, bucket_crop, fit_to_bucket, grid_for
from sdsweep.data.examples import Example
from sdsweep.data.images import (
    CaptionTransform,
    ImageCaptionDataset,
    ItemKey,
    crop_origin,
    dataset_for,
    draw_seed,
    open_rgb_bytes,
    resize_and_crop,
    resize_shorter_side,
    size_conditions,
    split_key,
    to_tensor,
    transformed_caption,
)
from sdsweep.models.tokens import tokenize_prompts

logger = logging.getLogger(__name__)

CACHE_VERSION = 2  # bump when the file layout or the encoding changes
ENCODE_BATCH_SIZE = 8  # images per VAE call: bounded memory at 512-768 px on a GPU
PLAIN, FLIPPED, TEXT = "latent_params", "latent_params_flipped", "text_embeddings"
ROWS, BUCKET_SEP = "rows", "@"  # bucketed caches: "latent_params@24x40" holds the images in "rows@24x40"
# Size-conditioned versions (SDXL) only: the pooled text embeddings [U, P] beside TEXT, and each image's
# (original height, width, crop top, crop left) [N, 4], for the plain and the flipped latents.
TEXT_POOLED, SIZES, SIZES_FLIPPED = "text_pooled", "size_conditions", "size_conditions_flipped"


def model_content(cfg: Config, source: str, subfolders: tuple[str, ...]) -> str:
    """What the model's parts that shape the cache hold (sdsweep/content.py): the same model reached through
    another path or mount point gives the same key, and a re-saved model at the same path a new one. Each
    weight file is read once per path, size and mtime (the hashes are cached by the machine's sdsweep cache)."""
    from sdsweep.models.tiny import file_hash_cache

    return folder_identity(source, file_hash_cache(cfg.paths.cache), subfolders)


def read_images(examples: list[Example]) -> list[bytes]:
    """Every image's bytes, read once: the cache key and the encoded latents come from the same bytes, so an
    image replaced meanwhile can never leave latents of one version under the key of another."""
    return [Path(example.image_path).read_bytes() for example in examples]


def cache_key(
    cfg: Config,
    components: Any,
    examples: list[Example],
    captions: list[str] | None,
    images: list[bytes] | None = None,
) -> str:
    """The content hash naming a cache file; ``captions`` is None when no text is cached."""
    digest = hashlib.sha256()
    version = components.version
    parts = ("vae", *version.text_encoder_parts, *version.tokenizer_parts) if captions else ("vae",)
    header = {
        "version": CACHE_VERSION,
        "model": model_content(cfg, components.source, parts),
        "revision": cfg.model.revision,
        "variant": cfg.model.variant,
        "vae_dtype": str(components.vae.dtype),
        "text_encoder_dtype": str(components.text_encoder.dtype) if captions else None,
        "resolution": resolved_resolution(cfg),
        "center_crop": cfg.data.center_crop,
        "random_flip": cfg.data.random_flip,
        "captions": captions,
    }
    if version.size_conditioned:  # only then, so that SD caches keep their names
        header["size_conditions"] = True
        header["vae_path"] = cfg.model.vae_path
    if cfg.train.bucketing:  # only then, so that square caches keep their names
        header["buckets"] = grid_for(cfg, components).buckets()
    digest.update(json.dumps(header, sort_keys=True).encode())
    for blob in images if images is not None else read_images(examples):
        digest.update(hashlib.sha256(blob).digest())
    return digest.hexdigest()[:32]


class LatentCache:
    """Loads the study's encoded dataset, encoding it on first use.

    ``encode_calls`` counts VAE encode calls made by every LatentCache in this process, so tests and
    benchmarks can see that a second trial reused the file.
    """

    encode_calls: ClassVar[int] = 0

    def __init__(self, cfg: Config, components: Any, cache_dir: Path):
        self.cfg = cfg
        self.components = components
        self.folder = Path(cache_dir) / "latents"

    def path_for(
        self, examples: list[Example], captions: list[str] | None, images: list[bytes] | None = None
    ) -> Path:
        return self.folder / f"{cache_key(self.cfg, self.components, examples, captions, images)}.safetensors"

    def load_or_encode(self, examples: list[Example], captions: list[str] | None) -> dict[str, torch.Tensor]:
        """``latent_params`` [N, 2C, h, w] (+ ``latent_params_flipped``) and, with captions,
        ``text_embeddings`` [U, 77, D] for the sorted unique captions."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file, save

        images = read_images(examples)
        path = self.path_for(examples, captions, images)
        if path.exists():
            try:
                return load_file(str(path))
            except (SafetensorError, OSError) as error:  # unreadable (disk trouble): rebuild it
                logger.warning("latent cache %s is unreadable (%s); encoding again", path, error)
        elif any(self.folder.glob("*.safetensors")):
            # Keyed by content and settings, never by path: a moved study finds its latents; this data,
            # model or setting is new to the study, so it is encoded once, here.
            print(
                f"[sdsweep] latent cache: no latents yet for these {len(examples)} images with this model and "
                f"these settings; encoding them once ({path.name})",
                flush=True,
            )
        decoded = [open_rgb_bytes(blob) for blob in images]
        tensors = self._encode_images(decoded)
        if self.components.version.size_conditioned:
            tensors.update(self._size_conditions(decoded))
        if captions is not None:
            tensors.update(self._encode_text(sorted(set(captions))))
        io.atomic_write_bytes(path, save({k: v.contiguous() for k, v in tensors.items()}))
        return tensors

    @torch.no_grad()
    def _encode_images(self, images: list[Any]) -> dict[str, torch.Tensor]:
        if self.cfg.train.bucketing:
            return self._encode_bucketed(images)
        resolution = resolved_resolution(self.cfg)
        return self._encode_pixels(torch.stack([to_tensor(resize_and_crop(im, resolution)) for im in images]))

    def _size_conditions(self, images: list[Any]) -> dict[str, torch.Tensor]:
        """Each image's original size and centre crop (the cache holds centre crops only: square, or of its
        bucket), plain and flipped, by image index."""
        resolution = resolved_resolution(self.cfg)
        square = (resolution, resolution)
        buckets = None
        if self.cfg.train.bucketing:
            buckets = assign_buckets(images, grid_for(self.cfg, self.components).buckets())
        out = {SIZES: [], SIZES_FLIPPED: []}
        for i, image in enumerate(images):
            if buckets is None:
                crop, resized = square, resize_shorter_side(image, resolution).size
                origin = crop_origin(resized, resolution, center=True)
            else:
                crop = buckets[i]
                resized, origin = bucket_crop(image.size, crop)
            out[SIZES].append(size_conditions(image.size, resized, crop, origin, flipped=False))
            out[SIZES_FLIPPED].append(size_conditions(image.size, resized, crop, origin, flipped=True))
        return {name: torch.stack(rows) for name, rows in out.items()}

    def _encode_pixels(self, pixels: torch.Tensor, suffix: str = "") -> dict[str, torch.Tensor]:
        vae = self.components.vae
        device = next(vae.parameters()).device
        variants = {PLAIN: pixels}
        if self.cfg.data.random_flip:
            variants[FLIPPED] = pixels.flip(-1)
        out = {}
        for name, batch in variants.items():
            chunks = []
            for chunk in batch.split(ENCODE_BATCH_SIZE):
                chunks.append(vae.encode(chunk.to(device, vae.dtype)).latent_dist.parameters.float().cpu())
                LatentCache.encode_calls += 1
            out[name + suffix] = torch.cat(chunks)
        return out

    def _encode_bucketed(self, images: list[Any]) -> dict[str, torch.Tensor]:
        """Per bucket ``WxH``: ``latent_params@WxH`` (+ flipped) and ``rows@WxH``, the image indices."""
        assigned = assign_buckets(images, grid_for(self.cfg, self.components).buckets())
        out: dict[str, torch.Tensor] = {}
        for bucket in sorted(set(assigned)):
            rows = [i for i, b in enumerate(assigned) if b == bucket]
            suffix = f"{BUCKET_SEP}{bucket[0]}x{bucket[1]}"
            pixels = torch.stack([to_tensor(fit_to_bucket(images[i], bucket)) for i in rows])
            out.update(self._encode_pixels(pixels, suffix))
            out[ROWS + suffix] = torch.tensor(rows, dtype=torch.int64)
        return out

    @torch.no_grad()
    def _encode_text(self, captions: list[str]) -> dict[str, torch.Tensor]:
        """``text_embeddings`` [U, 77, D] (+ ``text_pooled`` [U, P] where the version pools) for the captions."""
        components = self.components
        encoders, version = components.text_encoders, components.version
        device = next(encoders[0].parameters()).device
        hidden, pooled = [], []
        for start in range(0, len(captions), ENCODE_BATCH_SIZE):
            chunk = captions[start : start + ENCODE_BATCH_SIZE]
            ids = [tokenize_prompts(tokenizer, chunk).to(device) for tokenizer in components.tokenizers]
            text = version.encode(encoders, ids)
            hidden.append(text.hidden_states.float().cpu())
            if text.pooled is not None:
                pooled.append(text.pooled.float().cpu())
        return {TEXT: torch.cat(hidden), **({TEXT_POOLED: torch.cat(pooled)} if pooled else {})}


def split_parameters(parameters: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and std from stored parameters, exactly as diffusers' DiagonalGaussianDistribution does."""
    mean, logvar = torch.chunk(parameters, 2, dim=1)
    return mean, torch.exp(0.5 * torch.clamp(logvar, -30.0, 20.0))


class CachedLatentDataset(torch.utils.data.Dataset):
    """Items ``{"latents": [C, h, w] x scaling, "caption", "index"}`` (+ ``encoder_hidden_states``).

    Each draw samples its latent (and picks its flip) from a generator seeded by ``(seed, index,
    draw)``, so training is reproducible and resumable whatever the fetch order.
    """

    supports_draw_keys = True

    def __init__(
        self,
        tensors: dict[str, torch.Tensor],
        captions: list[str],
        scaling: float,
        seed: int = 0,
        caption_transform: CaptionTransform | None = None,
    ):
        # Mean and std are split once here: the per-item work is one randn and one fused multiply-add.
        self.means, self.stds = {}, {}
        for name in (PLAIN, FLIPPED):
            if name in tensors:
                self.means[name], self.stds[name] = split_parameters(tensors[name])
        self.bucket_ids: list[int] | None = None  # bucketed: image i's bucket number (one shape each)
        if PLAIN not in tensors:
            self._split_buckets(tensors, len(captions))
        self.captions = list(captions)
        self.scaling = scaling
        self.seed = seed
        self.caption_transform = caption_transform
        self.text_rows: list[int] | None = None
        self.pooled = tensors.get(TEXT_POOLED)
        self.sizes = {PLAIN: tensors.get(SIZES), FLIPPED: tensors.get(SIZES_FLIPPED)}
        if TEXT in tensors:
            # Rows of the stored embeddings follow the sorted unique captions (an instance set has one).
            row_of = {caption: row for row, caption in enumerate(sorted(set(self.captions)))}
            self.text = tensors[TEXT]
            self.text_rows = [row_of[caption] for caption in self.captions]

    def _split_buckets(self, tensors: dict[str, torch.Tensor], count: int) -> None:
        """Per-image views of a bucketed cache: ``means[variant][i]`` then works as for a square one."""
        suffixes = sorted(key.split(BUCKET_SEP, 1)[1] for key in tensors if key.startswith(ROWS + BUCKET_SEP))
        self.bucket_ids = [-1] * count
        for name in (PLAIN, FLIPPED):
            if f"{name}{BUCKET_SEP}{suffixes[0]}" in tensors:
                self.means[name], self.stds[name] = [None] * count, [None] * count
        for number, suffix in enumerate(suffixes):
            rows = tensors[f"{ROWS}{BUCKET_SEP}{suffix}"].tolist()
            for name in self.means:
                means, stds = split_parameters(tensors[f"{name}{BUCKET_SEP}{suffix}"])
                for position, row in enumerate(rows):
                    self.means[name][row], self.stds[name][row] = means[position], stds[position]
            for row in rows:
                self.bucket_ids[row] = number

    def __len__(self) -> int:
        return len(self.captions)

    def sample_latents(self, index: int, flipped: bool, generator: torch.Generator) -> torch.Tensor:
        """A scaled latent drawn from the stored distribution of image ``index``."""
        variant = FLIPPED if flipped else PLAIN
        mean, std = self.means[variant][index], self.stds[variant][index]
        noise = torch.randn(mean.shape, generator=generator, dtype=mean.dtype)
        return (mean + std * noise) * self.scaling

    def __getitem__(self, key: ItemKey) -> dict[str, Any]:
        index, draw = split_key(key)
        seed = draw_seed(self.seed, index, draw)
        flipped = FLIPPED in self.means and random.Random(seed).random() < 0.5
        latents = self.sample_latents(index, flipped, torch.Generator().manual_seed(seed))
        caption = transformed_caption(self.caption_transform, self.captions[index], self.seed, index, draw)
        item = {"latents": latents, "caption": caption, "index": index}
        sizes = self.sizes[FLIPPED if flipped else PLAIN]
        if sizes is not None:
            item["size_conditions"] = sizes[index]
        if self.text_rows is not None:
            item["encoder_hidden_states"] = self.text[self.text_rows[index]]
            if self.pooled is not None:
                item["pooled_text_embeds"] = self.pooled[self.text_rows[index]]
        return item


def build_training_dataset(
    cfg: Config, components: Any, method: Any, examples: list[Example], cache_dir: Path | None
) -> torch.utils.data.Dataset:
    """The cached dataset when ``train.use_latent_cache`` (the default), else the pixel dataset.

    Random crops differ every draw, and caching one crop would silently remove that augmentation, so
    ``data.center_crop=false`` also uses the pixel dataset (the VAE then encodes every step).
    """
    if not cfg.train.use_latent_cache or cache_dir is None or not cfg.data.center_crop:
        if cfg.train.bucketing:
            return BucketedImageDataset(
                examples,
                grid_for(cfg, components),
                center_crop=cfg.data.center_crop,
                random_flip=cfg.data.random_flip,
                seed=cfg.train.seed,
                caption_transform=method.transform_caption,
            )
        return dataset_for(cfg, examples, method.transform_caption)
    cache = LatentCache(cfg, components, Path(cache_dir))
    if method.uses_frozen_text_encoder():
        # A frozen-text method's caption transform is fixed per caption, so it runs once, here.
        captions = [method.transform_caption(e.caption) for e in examples]
        tensors = cache.load_or_encode(examples, captions)
        return CachedLatentDataset(tensors, captions, components.latent_scaling, cfg.train.seed)
    # Trained text (or embeddings): captions are transformed per draw (textual inversion templates).
    tensors = cache.load_or_encode(examples, None)
    return CachedLatentDataset(
        tensors,
        [e.caption for e in examples],
        components.latent_scaling,
        cfg.train.seed,
        caption_transform=method.transform_caption,
    )


__all__ = [
    "CachedLatentDataset",
    "ImageCaptionDataset",
    "LatentCache",
    "build_training_dataset",
    "cache_key",
    "split_parameters",
]
