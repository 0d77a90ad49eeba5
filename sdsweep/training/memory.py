"""Predict a training run's peak accelerator memory before any weights load.

The prediction is built from what sets the memory of a Stable Diffusion fine-tune:

* **parameters** of the UNet, VAE and text encoder, in the dtype each is kept in;
* **gradients** and **optimizer state** of the trainable parameters only (AdamW keeps two fp32 moments,
  8-bit AdamW two bytes, Lion one moment, Prodigy four tensors per parameter);
* **activations** saved for the backward pass. These are not guessed from a formula: the real diffusers
  modules are built on PyTorch's ``meta`` device (shapes, no storage) from the model's own config files, and
  one forward pass at the run's batch and resolution is traced with ``saved_tensors_hooks``, which sees every
  tensor autograd keeps. With the method's trainable set marked (the full UNet, LoRA adapters, or nothing but
  the embedding table), the trace counts exactly what that method keeps. With gradient checkpointing only the
  block inputs stay, plus one block's activations while it is recomputed (``memory_trace``).

Tracing costs about a second for the full SD-1.5 UNet and no memory, so it runs before every training run.
The prediction is recorded next to the measured CUDA peak in each trial's metrics, so the model can be
checked on any GPU.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

import torch

from sdsweep.config.features import optimizer_name
from sdsweep.config.resolve import resolved_resolution
from sdsweep.config.schema import Config
from sdsweep.errors import ConfigError
from sdsweep.training.memory_trace import (
    TrainingFootprint,
    any_trainable,
    build_on_meta,
    build_second_text_encoder_on_meta,
    mark_trainable,
    spec_of,
    trace_text_encoder_activations,
    trace_unet_activations,
)

GIB = 2**30
# Bytes of optimizer state per trainable parameter.
OPTIMIZER_STATE_BYTES = {"adamw": 8, "adamw8bit": 2, "lion": 4, "prodigy": 16}
# cuBLAS/cuDNN workspaces and allocator fragmentation, which torch.cuda.max_memory_allocated partly sees.
WORKSPACE_FRACTION = 0.08
WORKSPACE_FIXED = int(0.25 * GIB)


@dataclass(frozen=True)
class MemoryEstimate:
    """Predicted peak memory of one training run, in bytes, by what holds it."""

    weights: int
    gradients: int
    optimizer_state: int
    ema: int
    activations: int
    recompute: int  # one block's activations rebuilt during backward (gradient checkpointing only)
    workspace: int
    trainable_parameters: int

    @property
    def total(self) -> int:
        return sum(getattr(self, f.name) for f in fields(self) if f.name != "trainable_parameters")

    def gib(self) -> dict[str, float]:
        parts = {f.name: round(getattr(self, f.name) / GIB, 3) for f in fields(self)}
        parts.pop("trainable_parameters")
        parts["total"] = round(self.total / GIB, 3)
        return parts

    def describe(self) -> str:
        parts = self.gib()
        shown = ", ".join(
            f"{name.replace('_', ' ')} {value:.2f}" for name, value in parts.items() if name != "total"
        )
        return f"predicted peak memory {parts['total']:.2f} GiB ({shown} GiB)"


# ---- from a config ---------------------------------------------------------------------------------------------
def compute_dtype_for(mixed_precision: str, device: torch.device) -> torch.dtype:
    from sdsweep.models.loading import resolve_mixed_precision

    resolved = resolve_mixed_precision(mixed_precision, device)
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(resolved, torch.float32)


def footprint_from_config(cfg: Config, device: torch.device) -> TrainingFootprint:
    from sdsweep.models.loading import frozen_weight_dtype

    method = cfg.method
    return TrainingFootprint(
        method=method.name,
        batch_size=cfg.train.train_batch_size,
        resolution=resolved_resolution(cfg),
        compute_dtype=compute_dtype_for(cfg.train.mixed_precision, device),
        frozen_dtype=frozen_weight_dtype(cfg, device),
        gradient_checkpointing=cfg.train.gradient_checkpointing,
        optimizer=optimizer_name(cfg),
        train_text_encoder=method.train_text_encoder,
        use_ema=method.use_ema,
        lora_rank=method.rank,
        lora_targets=tuple(method.target_modules),
        prior_preservation=spec_of(method.name).doubles_batch(method),
    )


def estimate_for_config(cfg: Config, device: torch.device) -> MemoryEstimate:
    """Read the model's config files (no weights) and predict the run's peak memory."""
    from sdsweep.models.loading import resolve_model_source

    source = resolve_model_source(cfg.model, cfg.paths.cache)
    return estimate_training_memory(load_model_configs(source), footprint_from_config(cfg, device))


def load_model_configs(source: str) -> dict[str, dict[str, Any]]:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig

    configs = {
        "unet": dict(UNet2DConditionModel.load_config(source, subfolder="unet")),
        "vae": dict(AutoencoderKL.load_config(source, subfolder="vae")),
        "text_encoder": CLIPTextConfig.from_pretrained(source, subfolder="text_encoder").to_dict(),
    }
    if (Path(source) / "text_encoder_2" / "config.json").exists():  # SDXL
        configs["text_encoder_2"] = CLIPTextConfig.from_pretrained(
            source, subfolder="text_encoder_2"
        ).to_dict()
    return configs


# ---- the estimate ------------------------------------------------------------------------------------------------
def estimate_training_memory(
    configs: dict[str, dict[str, Any]], footprint: TrainingFootprint
) -> MemoryEstimate:
    unet, vae, text_encoder = build_on_meta(configs)
    trainable = mark_trainable(unet, text_encoder, footprint)
    second = build_second_text_encoder_on_meta(configs, footprint)  # SDXL's; None for SD 1.x/2.x
    if second is not None:
        trainable += [p for p in second.parameters() if p.requires_grad]
    trainable_count = sum(p.numel() for p in trainable)
    weights = _bytes(unet.parameters(), torch.float32)  # the UNet (and adapters) stay fp32 masters
    weights += _bytes(vae.parameters(), footprint.frozen_dtype)
    text_dtype = torch.float32 if any_trainable(text_encoder) else footprint.frozen_dtype
    weights += _bytes(text_encoder.parameters(), text_dtype)
    if second is not None:
        weights += _bytes(
            second.parameters(), torch.float32 if any_trainable(second) else footprint.frozen_dtype
        )
    gradients = 4 * trainable_count
    optimizer_state = OPTIMIZER_STATE_BYTES[footprint.optimizer] * trainable_count
    ema = 4 * trainable_count if footprint.use_ema else 0
    # Autocast casts every fp32 UNet weight to the compute dtype and keeps the copy for the backward pass
    # (gradients flow through the UNet for every method); checkpointing drops them with the activations.
    low_precision = footprint.compute_dtype != torch.float32
    autocast_copies = 2 * _count(unet) if low_precision and not footprint.gradient_checkpointing else 0
    saved, largest_block = trace_unet_activations(unet, configs, footprint)
    saved += trace_text_encoder_activations(text_encoder, footprint)
    if second is not None:
        saved += trace_text_encoder_activations(second, footprint)
    activations = saved + autocast_copies
    recompute = largest_block if footprint.gradient_checkpointing else 0
    subtotal = weights + gradients + optimizer_state + ema + activations + recompute
    return MemoryEstimate(
        weights=weights,
        gradients=gradients,
        optimizer_state=optimizer_state,
        ema=ema,
        activations=activations,
        recompute=recompute,
        workspace=int(WORKSPACE_FRACTION * subtotal) + WORKSPACE_FIXED,
        trainable_parameters=trainable_count,
    )


def _bytes(parameters, dtype: torch.dtype) -> int:
    size = torch.empty((), dtype=dtype).element_size()
    return sum(p.numel() for p in parameters) * size


def _count(module) -> int:
    return sum(p.numel() for p in module.parameters())


# ---- before the run ------------------------------------------------------------------------------------------------
def device_memory(device: torch.device) -> int | None:
    """Free plus already-used-by-us memory of a CUDA device; None where it cannot be known (CPU)."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    free, _total = torch.cuda.mem_get_info(device)
    return int(free + torch.cuda.memory_reserved(device))


def alternatives(
    configs: dict[str, dict[str, Any]], footprint: TrainingFootprint, available: int
) -> list[str]:
    """Settings that would fit, cheapest change first, each with its predicted peak."""
    options: list[tuple[str, TrainingFootprint]] = []
    if not footprint.gradient_checkpointing:
        options.append(("train.gradient_checkpointing=true", replace(footprint, gradient_checkpointing=True)))
    if footprint.optimizer == "adamw":
        options.append(
            ("train.optimizer=adamw8bit (needs bitsandbytes)", replace(footprint, optimizer="adamw8bit"))
        )
    if footprint.batch_size > 1:
        smaller = replace(footprint, batch_size=max(1, footprint.batch_size // 2))
        options.append(
            (
                f"train.train_batch_size={smaller.batch_size} with train.gradient_accumulation_steps x2",
                smaller,
            )
        )
    both = replace(
        footprint,
        gradient_checkpointing=True,
        optimizer="adamw8bit" if footprint.optimizer == "adamw" else footprint.optimizer,
    )
    if both != footprint:
        options.append(("train.gradient_checkpointing=true and train.optimizer=adamw8bit", both))
    lighter = spec_of(footprint.method).lighter_method
    if lighter:
        options.append(
            (
                f"method={lighter}",
                replace(footprint, method=lighter, train_text_encoder=False, prior_preservation=False),
            )
        )
    fitting = []
    for label, candidate in options:
        total = estimate_training_memory(configs, candidate).total
        if total <= available:
            fitting.append(f"{label} (predicted {total / GIB:.1f} GiB)")
    return fitting


def check_fits(cfg: Config, device: torch.device, available: int | None = None) -> MemoryEstimate:
    """Predict the run's peak; on a device with less memory, one ConfigError that lists what would fit.

    ``available`` defaults to what the CUDA device has; on a CPU nothing is checked, only predicted.
    """
    from sdsweep.models.loading import resolve_model_source

    configs = load_model_configs(resolve_model_source(cfg.model, cfg.paths.cache))
    footprint = footprint_from_config(cfg, device)
    estimate = estimate_training_memory(configs, footprint)
    available = device_memory(device) if available is None else available
    if available is not None and estimate.total > available:
        fits = alternatives(configs, footprint, available)
        advice = (
            ("; ".join(fits))
            if fits
            else "none of gradient checkpointing, 8-bit Adam, a smaller batch or LoRA is predicted to fit"
        )
        raise ConfigError(
            f"{estimate.describe()} exceeds the {available / GIB:.1f} GiB available on {device}. "
            f"Settings predicted to fit: {advice}."
        )
    return estimate
