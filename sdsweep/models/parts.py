"""Model parts beyond SD's one text encoder and own VAE: SDXL's second text encoder, a replacement VAE."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from sdsweep.config.schema import ModelConfig
from sdsweep.models.versions import version_of_folder


class VaeUnavailableError(RuntimeError):
    """``model.vae_path`` cannot be loaded; model loading reports it as ModelUnavailableError."""


def load_second_text_encoder(source: str, variant: str | None) -> tuple[Any, Any] | None:
    """SDXL's second text encoder (with projection) and tokenizer; None for a one-encoder model."""
    if "text_encoder_2" not in version_of_folder(source).text_encoder_parts:
        return None
    from transformers import CLIPTextModelWithProjection, CLIPTokenizer

    encoder = CLIPTextModelWithProjection.from_pretrained(source, subfolder="text_encoder_2", variant=variant)
    return encoder, CLIPTokenizer.from_pretrained(source, subfolder="tokenizer_2")


def load_vae(model: ModelConfig, source: str):
    """The model's VAE, or ``model.vae_path``'s (a folder or hub ID holding a diffusers AutoencoderKL)."""
    from diffusers import AutoencoderKL

    if not model.vae_path:
        return AutoencoderKL.from_pretrained(source, subfolder="vae", variant=model.variant)
    path = Path(os.path.expanduser(model.vae_path))
    try:
        if path.is_dir():
            sub = "vae" if (path / "vae" / "config.json").exists() else None
            return AutoencoderKL.from_pretrained(str(path), subfolder=sub)
        return AutoencoderKL.from_pretrained(model.vae_path)
    except Exception as error:
        raise VaeUnavailableError(
            f"model.vae_path={model.vae_path!r} could not be loaded as a diffusers AutoencoderKL "
            f"({type(error).__name__}). Download it once (`huggingface-cli download {model.vae_path} "
            "--local-dir /models/vae`) and point model.vae_path at that folder."
        ) from None
