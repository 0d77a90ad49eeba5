"""Fine-tuning methods behind one interface; the method registry (``sdsweep.config.methods``) maps config
names to them through each spec's ``trainer``, so a plugin's method trains like a built-in one."""

from __future__ import annotations

from pathlib import Path

import torch

from sdsweep.config.methods import method_names, method_spec
from sdsweep.config.schema import Config
from sdsweep.errors import ConfigError
from sdsweep.training.methods.base import FineTuneMethod
from sdsweep.training.methods.dreambooth import DreamBooth
from sdsweep.training.methods.full import FullFineTune
from sdsweep.training.methods.lora import LoRA
from sdsweep.training.methods.textual_inversion import TextualInversion

# The built-in classes by name (their specs name them too); get_method serves plugins as well.
METHODS: dict[str, type[FineTuneMethod]] = {
    method.name: method for method in (FullFineTune, DreamBooth, TextualInversion, LoRA)
}


def get_method(name: str) -> type[FineTuneMethod]:
    """The method class for ``cfg.method.name``: the registered spec's ``trainer``."""
    spec = method_spec(name)
    if spec is None:
        raise ConfigError(
            f"Unknown fine-tuning method {name!r}. Choose one of {sorted(method_names())} "
            "(e.g. method=lora on the command line)."
        )
    return spec.trainer_class()


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
    method = get_method(cfg.method.name)  # an unknown name fails here with the allowed list
    return method.load_trained(cfg, Path(weights_dir), device, scheduler)


__all__ = ["METHODS", "FineTuneMethod", "get_method", "load_trained_pipeline"]
