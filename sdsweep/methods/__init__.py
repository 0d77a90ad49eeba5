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

METHODS: dict[str, type[FineTuneMethod]] = {
    method.name: method for method in (FullFineTune, DreamBooth, TextualInversion, LoRA)
}


def get_method(name: str) -> type[FineTuneMethod]:
    """The method class for ``cfg.method.name``."""
    try:
        return METHODS[name]
    except KeyError:
        raise ConfigError(
            f"Unknown fine-tuning method {name!r}. Choose one of {sorted(METHODS)} "
            "(e.g. method=lora on the command line)."
        ) from None


def load_trained_pipeline(
    cfg: Config,
    weights_dir: str | Path,
    device: torch.device | None = None,
    scheduler: str = "dpmsolver++",
):
    """A trial's saved weights loaded through diffusers' own loaders, the way users will load them.

    full/dreambooth saved a whole pipeline folder; textual inversion and LoRA saved a file that is
    applied to the base model named by ``cfg.model``.
    """
    from sdsweep.methods.lora import WEIGHTS_NAME as LORA_WEIGHTS
    from sdsweep.methods.textual_inversion import WEIGHTS_NAME as TI_WEIGHTS
    from sdsweep.models import load_pipeline, resolve_model_source

    get_method(cfg.method.name)  # an unknown name fails here with the allowed list
    weights_dir = Path(weights_dir)
    if cfg.method.name in (FullFineTune.name, DreamBooth.name):
        return load_pipeline(str(weights_dir), scheduler, device)
    pipe = load_pipeline(resolve_model_source(cfg.model, cfg.paths.cache), scheduler, device)
    if cfg.method.name == TextualInversion.name:
        pipe.load_textual_inversion(str(weights_dir / TI_WEIGHTS))
    else:
        pipe.load_lora_weights(str(weights_dir), weight_name=LORA_WEIGHTS)
    return pipe


__all__ = ["METHODS", "FineTuneMethod", "get_method", "load_trained_pipeline"]
