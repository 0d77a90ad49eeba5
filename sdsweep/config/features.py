"""Which optional features this machine can provide, and the error for one that was asked for but is missing.

A config rule, so it lives with the config: validation calls it before any model loads, and the modules that
use the packages (training.optimizers, evaluation.metrics) ask here too, so the two can never disagree.
"""

from __future__ import annotations

import importlib.util

from sdsweep.config.schema import Config
from sdsweep.errors import ConfigError

# optimizer name -> (import name, pip package) for the optional ones
OPTIONAL_OPTIMIZER_PACKAGES = {
    "adamw8bit": ("bitsandbytes", "bitsandbytes"),
    "prodigy": ("prodigyopt", "prodigyopt"),
    "lion": ("lion_pytorch", "lion-pytorch"),
}


def installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def torch_fidelity_available() -> bool:
    return installed("torch_fidelity")


def torchvision_available() -> bool:
    return installed("torchvision")


def optimizer_name(cfg: Config) -> str:
    """The optimizer actually used (the legacy ``method.use_8bit_adam`` was translated by ``normalise``)."""
    return cfg.train.optimizer


def check_optimizer_available(cfg: Config) -> None:
    """ConfigError naming the package (and the extra) when the chosen optimizer is not installed."""
    name = optimizer_name(cfg)
    if name not in OPTIONAL_OPTIMIZER_PACKAGES:
        return
    module, package = OPTIONAL_OPTIMIZER_PACKAGES[name]
    if installed(module):
        return
    key = f"train.optimizer={name}"
    extra = " (it needs a CUDA GPU)" if name == "adamw8bit" else ""
    raise ConfigError(
        f"Invalid config value {key}: the package {package!r} is not installed{extra}. Install it with "
        f"`pip install {package}` (or `pip install 'sdsweep[optimizers]'`), or use train.optimizer=adamw."
    )
