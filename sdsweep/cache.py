"""A latent and text-embedding cache shared by every trial of a study.

The frozen VAE gives the same latent distribution for the same image in every trial, so the dataset
is encoded once (both flips when flipping is on) and trials sample from the stored distribution. The
key hashes everything that changes the result (image bytes, captions, model, resolution, crop, flip),
so a stale cache is never read.
"""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path
from typing import Any

import torch

from sdsweep.config import Config, resolved_resolution
from sdsweep.data import (
    Example,
    ImageCaptionDataset,
    dataset_for,
    load_pil_images,
    resize_and_crop,
    to_tensor,
)

CACHE_VERSION = 1


def cache_key(cfg: Config, components, examples: list[Example], captions: list[str] | None) -> str:
    digest = hashlib.sha256()
    header = {
        "version": CACHE_VERSION,
        "model": components.source,
        "revision": cfg.model.revision,
        "variant": cfg.model.variant,
        "resolution": resolved_resolution(cfg),
        "center_crop": cfg.data.center_crop,
        "random_flip": cfg.data.random_flip,
        "captions": captions,
    }
    digest.update(json.dumps(header, sort_keys=True).encode())
    for example in examples:
        digest.update(example.image_path.read_bytes())
    return digest.hexdigest()[:24]


class LatentCache:
    """Encodes on first use and counts encodes, so tests and benches can see reuse."""

    encodes = 0  # VAE encode calls made by any LatentCache in this process

    def __init__(self, cfg: Config, components, cache_dir: Path):
        self.cfg = cfg
        self.components = components
        self.folder = Path(cache_dir) / "latents"

    @torch.no_grad()
    def _encode_images(self, examples: list[Example]) -> dict[str, torch.Tensor]:
        vae = self.components.vae
        device = next(vae.parameters()).device
        resolution = resolved_resolution(self.cfg)
        crops = [resize_and_crop(image, resolution, center_crop=True) for image in load_pil_images(examples)]
        variants = {"plain": crops}
        if self.cfg.data.random_flip:
            variants["flipped"] = [c.transpose(0) for c in crops]  # 0 == FLIP_LEFT_RIGHT
        out = {}
        for name, images in variants.items():
            pixels = torch.stack([to_tensor(i) for i in images]).to(device, vae.dtype)
            distribution = vae.encode(pixels).latent_dist
            LatentCache.encodes += 1
            # Store the distribution, not one sample: trials keep the VAE's sampling noise.
            out[f"{name}_mean"] = distribution.mean.float().cpu()
            out[f"{name}_std"] = distribution.std.float().cpu()
        return out

    @torch.no_grad()
    def _encode_text(self, captions: list[str]) -> torch.Tensor:
        tokenizer, encoder = self.components.tokenizer, self.components.text_encoder
        device = next(encoder.parameters()).device
        ids = tokenizer(
            captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
        ).input_ids.to(device)
        return encoder(ids, return_dict=False)[0].float().cpu()

    def load_or_encode(self, examples: list[Example], captions: list[str] | None) -> dict[str, torch.Tensor]:
        from safetensors.torch import load_file, save_file

        path = self.folder / f"{cache_key(self.cfg, self.components, examples, captions)}.safetensors"
        if path.exists():
            return load_file(str(path))
        tensors = self._encode_images(examples)
        if captions is not None:
            tensors["text"] = self._encode_text(captions)
        self.folder.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{random.getrandbits(32):08x}.tmp")
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))
        tmp.replace(path)
        return tensors


class CachedLatentDataset(torch.utils.data.Dataset):
    """Items with ``latents`` (sampled from the stored distribution, scaled) instead of pixels."""

    def __init__(self, tensors: dict[str, torch.Tensor], captions: list[str], scaling: float, random_flip: bool, seed: int):
        self.tensors = tensors
        self.captions = captions
        self.scaling = scaling
        self.random_flip = random_flip
        self.rng = random.Random(seed)
        self.generator = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return len(self.captions)

    def __getitem__(self, index: int) -> dict[str, Any]:
        variant = "flipped" if self.random_flip and self.rng.random() < 0.5 else "plain"
        mean, std = self.tensors[f"{variant}_mean"][index], self.tensors[f"{variant}_std"][index]
        latents = (mean + std * torch.randn(mean.shape, generator=self.generator)) * self.scaling
        item = {"latents": latents, "caption": self.captions[index], "index": index}
        if "text" in self.tensors:
            item["encoder_hidden_states"] = self.tensors["text"][index]
        return item


def build_training_dataset(cfg: Config, components, method, examples: list[Example], cache_dir: Path | None):
    """The cached dataset when ``train.use_latent_cache`` (the default), else pixels encoded per step."""
    if not cfg.train.use_latent_cache or cache_dir is None:
        return dataset_for(cfg, examples, method.transform_caption)
    if not cfg.data.center_crop:
        # Random crops differ every epoch; caching one crop would silently remove that augmentation.
        return dataset_for(cfg, examples, method.transform_caption)
    frozen_text = method.uses_frozen_text_encoder()
    # Captions of a frozen-text method are fixed per image (templates only exist for textual inversion).
    captions = [method.transform_caption(e.caption) for e in examples]
    tensors = LatentCache(cfg, components, cache_dir).load_or_encode(examples, captions if frozen_text else None)
    if not frozen_text:
        return _LiveCaptions(tensors, examples, method, components.latent_scaling, cfg)
    return CachedLatentDataset(tensors, captions, components.latent_scaling, cfg.data.random_flip, cfg.train.seed)


class _LiveCaptions(CachedLatentDataset):
    """Cached latents, captions transformed per item (textual inversion templates, trained text encoder)."""

    def __init__(self, tensors, examples: list[Example], method, scaling: float, cfg: Config):
        super().__init__(tensors, [e.caption for e in examples], scaling, cfg.data.random_flip, cfg.train.seed)
        self.transform = method.transform_caption

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = super().__getitem__(index)
        item["caption"] = self.transform(item["caption"])
        return item


__all__ = ["LatentCache", "CachedLatentDataset", "ImageCaptionDataset", "build_training_dataset", "cache_key"]
