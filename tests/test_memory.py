"""The peak-memory prediction: traced on the meta device from the real model configs, before any weights load."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from sdsweep.errors import ConfigError
from sdsweep.models.loading import load_components, resolve_model_source
from sdsweep.training.memory import (
    GIB,
    check_fits,
    estimate_for_config,
    estimate_training_memory,
    footprint_from_config,
    load_model_configs,
)
from sdsweep.training.memory_trace import SavedTensorCounter, TrainingFootprint


@pytest.fixture(scope="module")
def tiny_configs(tiny_model_dirs):
    return load_model_configs(str(tiny_model_dirs["sd15"]))


def footprint(method="full", batch=2, checkpointing=False, optimizer="adamw") -> TrainingFootprint:
    return TrainingFootprint(
        method=method,
        batch_size=batch,
        resolution=32,
        compute_dtype=torch.float32,
        frozen_dtype=torch.float32,
        gradient_checkpointing=checkpointing,
        optimizer=optimizer,
    )


def test_parts_follow_the_settings(tiny_configs):
    full = estimate_training_memory(tiny_configs, footprint("full", batch=2))
    # Parameters, gradients and AdamW's two moments: 4 + 8 bytes per trainable fp32 parameter.
    assert full.gradients == 4 * full.trainable_parameters
    assert full.optimizer_state == 8 * full.trainable_parameters
    bigger = estimate_training_memory(tiny_configs, footprint("full", batch=4))
    assert bigger.activations > 1.8 * full.activations  # activations scale with the batch
    assert bigger.weights == full.weights
    checkpointed = estimate_training_memory(tiny_configs, footprint("full", batch=4, checkpointing=True))
    assert checkpointed.activations < bigger.activations
    assert checkpointed.recompute > 0
    lora = estimate_training_memory(tiny_configs, footprint("lora", batch=2))
    assert lora.trainable_parameters < full.trainable_parameters / 10
    assert lora.total < full.total
    eight_bit = estimate_training_memory(tiny_configs, footprint("full", batch=2, optimizer="adamw8bit"))
    assert eight_bit.optimizer_state == 2 * eight_bit.trainable_parameters
    assert "predicted peak memory" in full.describe()


def test_meta_trace_matches_a_real_forward(tiny_cfg, tiny_configs):
    """What the meta-device trace counts is what a real forward of the loaded tiny UNet keeps."""
    components = load_components(tiny_cfg)
    unet = components.unet
    unet.requires_grad_(True)
    unet.train()
    config = tiny_configs["unet"]
    side = 32 // 2  # the tiny VAE downsamples by 2
    sample = torch.randn(2, config["in_channels"], side, side)
    context = torch.randn(2, 77, config["cross_attention_dim"])
    counter = SavedTensorCounter(unet.parameters())
    with counter:
        unet(sample, torch.tensor([10, 500]), context)
    predicted = estimate_training_memory(tiny_configs, footprint("full", batch=2))
    # The meta trace may keep a few reshaped copies the CPU kernels avoid: a small over-prediction, never under.
    assert counter.total <= predicted.activations <= 1.1 * counter.total


def test_estimate_from_config_and_trainable_count(tiny_cfg, tiny_configs):
    cfg = dataclasses.replace(tiny_cfg)
    estimate = estimate_for_config(cfg, torch.device("cpu"))
    components = load_components(cfg)
    unet_params = sum(p.numel() for p in components.unet.parameters())
    assert estimate.trainable_parameters == unet_params  # a full fine-tune trains the whole UNet
    assert footprint_from_config(cfg, torch.device("cpu")).compute_dtype == torch.float32
    assert resolve_model_source(cfg.model, cfg.paths.cache)


def test_too_little_memory_names_what_would_fit(tiny_cfg):
    cfg = tiny_cfg
    cfg.train.train_batch_size = 8
    needed = check_fits(cfg, torch.device("cpu"))  # CPU: predicted, not checked
    with pytest.raises(ConfigError) as error:
        # Short by a third of the activations: checkpointing or half the batch makes up for it.
        check_fits(cfg, torch.device("cpu"), available=needed.total - needed.activations // 3)
    message = str(error.value)
    assert "exceeds" in message and f"{needed.total / GIB:.2f}" in message
    assert "train.gradient_checkpointing=true (predicted" in message
    assert "train.train_batch_size=4" in message


def test_the_advice_names_the_optimizer_and_the_lighter_method_from_the_spec(tiny_cfg):
    """8-bit Adam is advised by its one spelling (train.optimizer), and a full fine-tune's lighter method
    comes from its MethodSpec (lighter_method)."""
    needed = check_fits(tiny_cfg, torch.device("cpu"))
    with pytest.raises(ConfigError) as error:
        check_fits(tiny_cfg, torch.device("cpu"), available=needed.total - 1)
    message = str(error.value)
    assert "train.optimizer=adamw8bit (needs bitsandbytes) (predicted" in message
    assert "method=lora (predicted" in message and "use_8bit_adam" not in message
