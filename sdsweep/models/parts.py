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


def vae_path_problem(model: ModelConfig) -> str | None:
    """Why ``model.vae_path`` cannot be loaded, told before any model loads; None when it can (or is unset).

    Only a local path is checked (absolute, ``~``/``.``-relative, or an existing folder); anything else is a
    hub ID, resolved by ``resolve_model_source``'s rules when the VAE loads."""
    raw = str(model.vae_path or "")
    if not raw:
        return None
    path = Path(os.path.expanduser(raw))
    if not (path.is_absolute() or raw.startswith((".", "~")) or path.exists()):
        return None
    if (path / "config.json").is_file() or (path / "vae" / "config.json").is_file():
        return None
    found = "does not exist" if not path.exists() else "holds no AutoencoderKL (config.json in it or in vae/)"
    return (
        f"model.vae_path={raw!r} {found}. Download the VAE (`huggingface-cli download "
        "madebyollin/sdxl-vae-fp16-fix --local-dir /models/sdxl-vae-fp16-fix`) and set model.vae_path to "
        "that folder, or leave model.vae_path unset to use the model's own VAE."
    )


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
