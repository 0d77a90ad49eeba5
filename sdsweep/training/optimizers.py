"""The optimizer factory: ``train.optimizer`` -> a torch optimizer over the trainable parameters, at the
effective learning rate (``method.learning_rate``, scaled by the global batch with ``method.scale_lr``).

adamw (torch), adamw8bit (bitsandbytes, CUDA only), prodigy (prodigyopt) and lion (lion-pytorch). The
optional ones come from the ``optimizers`` extra; asking for one that is not installed is a
``ConfigError`` raised while the config is validated, before any model loads.

Prodigy estimates the step size itself: its ``lr`` multiplies the estimate and is normally 1.0, so a
learning-rate sweep with Prodigy sweeps that multiplier (the run logs a line saying so).
"""

from __future__ import annotations

import logging

import torch

from sdsweep.config.features import check_optimizer_available, optimizer_name
from sdsweep.config.methods import method_spec
from sdsweep.config.schema import Config
from sdsweep.errors import ConfigError

logger = logging.getLogger(__name__)


def weight_decay_of(cfg: Config) -> float:
    """train.adam_weight_decay, or 0 for a method that must not decay (``MethodSpec.decays_weights``)."""
    spec = method_spec(cfg.method.name)
    return cfg.train.adam_weight_decay if spec is None or spec.decays_weights else 0.0


def effective_learning_rate(cfg: Config) -> float:
    lr = cfg.method.learning_rate
    if cfg.method.scale_lr:
        # The global batch, as diffusers' examples scale it.
        lr *= cfg.train.train_batch_size * cfg.train.gradient_accumulation_steps * cfg.train.num_processes
    return lr


def make_optimizer(
    cfg: Config, params: list[torch.nn.Parameter], device: torch.device
) -> torch.optim.Optimizer:
    """The configured optimizer at the effective learning rate (for Prodigy, the lr multiplier)."""
    lr = effective_learning_rate(cfg)
    name = optimizer_name(cfg)
    check_optimizer_available(cfg)
    train = cfg.train
    betas = (train.adam_beta1, train.adam_beta2)
    weight_decay = weight_decay_of(cfg)
    if name == "adamw8bit":
        if device.type != "cuda":
            raise ConfigError(
                "Invalid config value train.optimizer=adamw8bit: bitsandbytes' 8-bit AdamW runs on CUDA only and the device "
                f"is {device}; use train.optimizer=adamw on this machine."
            )
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(
            params, lr=lr, betas=betas, eps=train.adam_epsilon, weight_decay=weight_decay
        )
    if name == "prodigy":
        from prodigyopt import Prodigy

        logger.info(
            "train.optimizer=prodigy estimates its own step size: the learning rate %g is a multiplier of "
            "that estimate (normally 1.0), and a learning-rate sweep sweeps the multiplier",
            lr,
        )
        # Bias correction and, with warmup, the safeguard: the settings kohya and OneTrainer document
        # for diffusion fine-tuning (without the safeguard the estimate overshoots during warmup).
        return Prodigy(
            params,
            lr=lr,
            betas=betas,
            eps=train.adam_epsilon,
            weight_decay=weight_decay,
            use_bias_correction=True,
            safeguard_warmup=train.lr_warmup_steps > 0,
        )
    if name == "lion":
        from lion_pytorch import Lion

        # Lion keeps its own betas (0.9, 0.99), the paper's; the adam_* betas suit AdamW's second moment.
        return Lion(params, lr=lr, weight_decay=weight_decay)
    # foreach: one fused kernel launch per parameter group instead of one per tensor.
    return torch.optim.AdamW(
        params, lr=lr, betas=betas, eps=train.adam_epsilon, weight_decay=weight_decay, foreach=True
    )
