"""The GPU code path on the CPU: frozen parts in half precision, sampling precision, compile, unavailable features.

The same functions run on CUDA; here they run on the tiny model so they cannot rot where no GPU is.
"""

from __future__ import annotations

import shutil

import pytest
import torch

from sdsweep.models.loading import (
    frozen_weight_dtype,
    load_components,
    sampling_dtype,
    sampling_precision,
    unavailable_features,
)
from sdsweep.training.methods import get_method


def test_cpu_keeps_fp32_and_cuda_settings_resolve(tiny_cfg):
    cpu = torch.device("cpu")
    assert frozen_weight_dtype(tiny_cfg, cpu) == torch.float32
    assert sampling_dtype("auto", cpu) == torch.float32
    assert sampling_dtype("bf16", cpu) == torch.bfloat16
    with sampling_precision("auto", cpu):  # a no-op context on CPU
        assert not torch.is_autocast_enabled("cpu")


@pytest.mark.parametrize("method_name", ["full", "textual_inversion"])
def test_half_precision_frozen_parts_train(tiny_cfg, method_name):
    """VAE and text encoder in bf16 (as on CUDA) feed the fp32 UNet: the loss is finite and backward runs."""
    tiny_cfg.method.name = method_name
    components = load_components(tiny_cfg, torch.device("cpu"), weight_dtype=torch.bfloat16)
    assert components.vae.dtype == torch.bfloat16
    # A text encoder that trains (textual inversion's embedding table) stays fp32.
    expected_text = torch.float32 if method_name == "textual_inversion" else torch.bfloat16
    assert components.text_encoder.dtype == expected_text
    assert components.unet.dtype == torch.float32
    method = get_method(method_name)(tiny_cfg, components, torch.device("cpu"))
    method.prepare()
    batch = {
        "pixel_values": torch.rand(2, 3, 32, 32) * 2 - 1,
        "captions": ["a photo of sks", "a photo of sks"],
    }
    loss, _ = method.compute_loss(method.augment_batch(batch))
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()
    grads = [p.grad for p in method.trainable_parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


def test_unavailable_features_are_named(tiny_cfg):
    cpu = torch.device("cpu")
    tiny_cfg.train.optimizer = "adamw8bit"  # what method.use_8bit_adam=true is translated into
    problems = unavailable_features(tiny_cfg, cpu)
    assert len(problems) == 1 and "bitsandbytes" in problems[0]
    tiny_cfg.train.optimizer = "adamw"
    tiny_cfg.train.compile = True
    has_compiler = any(shutil.which(cc) for cc in ("cc", "gcc", "clang"))
    assert (unavailable_features(tiny_cfg, cpu) == []) == has_compiler


@pytest.mark.slow
def test_compile_trains_on_cpu(tiny_cfg):
    """train.compile=true runs inductor on the CPU (it needs a C compiler) through the real training loop."""
    if not any(shutil.which(cc) for cc in ("cc", "gcc", "clang")):
        pytest.skip("no C compiler: torch.compile's inductor backend cannot build CPU kernels here")
    from sdsweep.training.train import train

    tiny_cfg.train.compile = True
    tiny_cfg.train.channels_last = True
    tiny_cfg.train.use_latent_cache = False
    tiny_cfg.train.max_train_steps = 2
    device = torch.device("cpu")
    components = load_components(tiny_cfg, device)
    method = get_method("full")(tiny_cfg, components, device)
    method.prepare()
    from sdsweep.data.examples import load_examples, split_examples
    from sdsweep.data.latent_cache import build_training_dataset

    examples, _ = split_examples(load_examples(tiny_cfg), tiny_cfg.data.num_heldout)
    dataset = build_training_dataset(tiny_cfg, components, method, examples, None)
    losses = []
    from sdsweep.training.train import TrainHooks

    result = train(
        tiny_cfg, method, dataset, [2], TrainHooks(on_step=lambda s, logs: losses.append(logs["train/loss"]))
    )
    assert result.final_step == 2
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
    assert getattr(components.unet, "_sdsweep_compiled", False)
