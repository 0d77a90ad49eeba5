"""Fine-tuning methods behind one interface; the registry maps config names to them."""

from __future__ import annotations

from pathlib import Path

import torch

from sdsweep.config import Config, ConfigError
from sdsweep.methods.base import FineTuneMethod
from sdsweep.methods.dreambooth import DreamBooth
from sdsweep.methods.full import FullFineTune
from sdsweep.methods.lora import LoRA
from sdsweep.methods.textual_inversion import TextualInversion

METHODS: dict[str, type[FineTuneMethod]] = {m.name: m for m in (FullFineTune, DreamBooth, TextualInversion, LoRA)}


def get_method(name: str) -> type[FineTuneMethod]:
    try:
        return METHODS[name]
    except KeyError:
        raise ConfigError(f"Unknown method {name!r}; method= must be one of {sorted(METHODS)}.") from None


def load_trained_pipeline(cfg: Config, weights_dir: Path, device: torch.device | None = None, scheduler: str = "dpmsolver++"):
    """A trial's saved weights, loaded through diffusers' own loaders (the way users will load them)."""
    from sdsweep.models import load_pipeline, resolve_model_source

    weights_dir = Path(weights_dir)
    if cfg.method.name in ("full", "dreambooth"):
        return load_pipeline(str(weights_dir), scheduler, device)
    pipe = load_pipeline(resolve_model_source(cfg.model, cfg.paths.cache), scheduler, device)
    if cfg.method.name == "textual_inversion":
        pipe.load_textual_inversion(str(weights_dir / "learned_embeds.safetensors"))
    else:
        pipe.load_lora_weights(str(weights_dir))
    return pipe


__all__ = ["METHODS", "FineTuneMethod", "get_method", "load_trained_pipeline"]
