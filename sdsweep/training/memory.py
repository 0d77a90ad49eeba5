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
  block inputs stay, plus one block's activations while it is recomputed.

Tracing costs about a second for the full SD-1.5 UNet and no memory, so it runs before every training run.
The prediction is recorded next to the measured CUDA peak in each trial's metrics, so the model can be
checked on any GPU.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, fields, replace
from typing import Any

import torch

from sdsweep.config.resolve import resolved_resolution
from sdsweep.config.schema import Config
from sdsweep.errors import ConfigError

GIB = 2**30
TOKENS = 77  # every SD prompt is padded to the CLIP context length
# Bytes of optimizer state per trainable parameter.
OPTIMIZER_STATE_BYTES = {"adamw": 8, "adamw8bit": 2, "lion": 4, "prodigy": 16}
# cuBLAS/cuDNN workspaces and allocator fragmentation, which torch.cuda.max_memory_allocated partly sees.
WORKSPACE_FRACTION = 0.08
WORKSPACE_FIXED = int(0.25 * GIB)
CHECKPOINTED_MODULES = {"ResnetBlock2D", "Transformer2DModel"}


@dataclass(frozen=True)
class TrainingFootprint:
    """The settings of a run that decide its memory; everything else (lr, steps, data) does not."""

    method: str
    batch_size: int
    resolution: int
    compute_dtype: torch.dtype  # the autocast dtype of the forward pass
    frozen_dtype: torch.dtype  # the dtype the frozen VAE and text encoder are kept in
    gradient_checkpointing: bool = False
    optimizer: str = "adamw"
    train_text_encoder: bool = False
    use_ema: bool = False
    lora_rank: int = 4
    lora_targets: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0")
    prior_preservation: bool = False  # DreamBooth: instance and class images in one batch

    @property
    def samples_per_step(self) -> int:
        return self.batch_size * (2 if self.prior_preservation else 1)


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


def optimizer_name(cfg: Config) -> str:
    name = str(getattr(cfg.train, "optimizer", "adamw"))
    return "adamw8bit" if cfg.method.use_8bit_adam and name == "adamw" else name


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
        prior_preservation=method.name == "dreambooth" and method.with_prior_preservation,
    )


def estimate_for_config(cfg: Config, device: torch.device) -> MemoryEstimate:
    """Read the model's config files (no weights) and predict the run's peak memory."""
    from sdsweep.models.loading import resolve_model_source

    source = resolve_model_source(cfg.model, cfg.paths.cache)
    return estimate_training_memory(load_model_configs(source), footprint_from_config(cfg, device))


def load_model_configs(source: str) -> dict[str, dict[str, Any]]:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig

    return {
        "unet": dict(UNet2DConditionModel.load_config(source, subfolder="unet")),
        "vae": dict(AutoencoderKL.load_config(source, subfolder="vae")),
        "text_encoder": CLIPTextConfig.from_pretrained(source, subfolder="text_encoder").to_dict(),
    }


# ---- the estimate ------------------------------------------------------------------------------------------------
def estimate_training_memory(
    configs: dict[str, dict[str, Any]], footprint: TrainingFootprint
) -> MemoryEstimate:
    unet, vae, text_encoder = build_on_meta(configs)
    trainable = mark_trainable(unet, text_encoder, footprint)
    trainable_count = sum(p.numel() for p in trainable)
    weights = _bytes(unet.parameters(), torch.float32)  # the UNet (and adapters) stay fp32 masters
    weights += _bytes(vae.parameters(), footprint.frozen_dtype)
    text_dtype = torch.float32 if _any_trainable(text_encoder) else footprint.frozen_dtype
    weights += _bytes(text_encoder.parameters(), text_dtype)
    gradients = 4 * trainable_count
    optimizer_state = OPTIMIZER_STATE_BYTES[footprint.optimizer] * trainable_count
    ema = 4 * trainable_count if footprint.use_ema else 0
    # Autocast casts every fp32 UNet weight to the compute dtype and keeps the copy for the backward pass
    # (gradients flow through the UNet for every method); checkpointing drops them with the activations.
    low_precision = footprint.compute_dtype != torch.float32
    autocast_copies = 2 * _count(unet) if low_precision and not footprint.gradient_checkpointing else 0
    saved, largest_block = trace_unet_activations(unet, configs, footprint)
    saved += trace_text_encoder_activations(text_encoder, footprint)
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


def build_on_meta(configs: dict[str, dict[str, Any]]):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(configs["unet"])
        vae = AutoencoderKL.from_config(configs["vae"])
        text_encoder = CLIPTextModel(CLIPTextConfig.from_dict(configs["text_encoder"]))
    for module in (unet, vae, text_encoder):
        module.requires_grad_(False)
    return unet, vae, text_encoder


def mark_trainable(unet, text_encoder, footprint: TrainingFootprint) -> list[torch.nn.Parameter]:
    """Set requires_grad the way the method's ``prepare()`` does, so the trace keeps what it keeps."""
    if footprint.method == "lora":
        from peft import LoraConfig

        with torch.device("meta"):
            unet.add_adapter(
                LoraConfig(
                    r=footprint.lora_rank,
                    lora_alpha=footprint.lora_rank,
                    target_modules=list(footprint.lora_targets),
                )
            )
    elif footprint.method == "textual_inversion":
        # The whole embedding table gets gradients; the method restores the old rows after each step.
        text_encoder.get_input_embeddings().weight.requires_grad_(True)
    else:  # full fine-tune and DreamBooth
        unet.requires_grad_(True)
        if footprint.train_text_encoder:
            text_encoder.requires_grad_(True)
    return [p for m in (unet, text_encoder) for p in m.parameters() if p.requires_grad]


def trace_unet_activations(
    unet, configs: dict[str, dict[str, Any]], footprint: TrainingFootprint
) -> tuple[int, int]:
    """Bytes autograd keeps for one UNet forward, and the largest checkpointed unit's share of them.

    The largest unit is what gradient checkpointing rebuilds at once during backward, so it is traced
    without checkpointing; the checkpointed total is traced separately.
    """
    batch = footprint.samples_per_step
    config = configs["unet"]
    factor = 2 ** (len(configs["vae"]["block_out_channels"]) - 1)
    side = footprint.resolution // factor
    dtype = footprint.compute_dtype
    unet.to(dtype)
    text_grad = footprint.method == "textual_inversion" or footprint.train_text_encoder
    sample = torch.empty(batch, config["in_channels"], side, side, device="meta", dtype=dtype)
    timesteps = torch.zeros(batch, dtype=torch.long, device="meta")
    context = torch.empty(batch, TOKENS, config["cross_attention_dim"], device="meta", dtype=dtype)
    context.requires_grad_(text_grad)
    unet.train()
    unet.disable_gradient_checkpointing()
    counter = SavedTensorCounter(unet.parameters())
    # diffusers checkpoints each resnet and each transformer on its own: those are the units rebuilt at once.
    blocks = [m for m in unet.modules() if type(m).__name__ in CHECKPOINTED_MODULES]
    handles = [b.register_forward_pre_hook(counter.open_block) for b in blocks]
    handles += [b.register_forward_hook(counter.close_block) for b in blocks]
    with counter, fused_attention_trace():
        unet(sample, timesteps, context)
    for handle in handles:
        handle.remove()
    full, largest = counter.total, counter.largest_block
    if not footprint.gradient_checkpointing:
        return full, largest
    unet.enable_gradient_checkpointing()
    counter = SavedTensorCounter(unet.parameters())
    with counter, fused_attention_trace():
        unet(sample, timesteps, context)
    unet.disable_gradient_checkpointing()
    return counter.total, largest


def trace_text_encoder_activations(text_encoder, footprint: TrainingFootprint) -> int:
    if not _any_trainable(text_encoder):
        return 0  # a frozen encoder runs under no_grad: nothing is kept
    text_encoder.to(footprint.compute_dtype)
    ids = torch.zeros(footprint.samples_per_step, TOKENS, dtype=torch.long, device="meta")
    counter = SavedTensorCounter(text_encoder.parameters())
    with counter:
        text_encoder(ids)
    return counter.total


class _FusedAttention(torch.autograd.Function):
    """Stands in for scaled_dot_product_attention during a trace, keeping what fused kernels keep.

    On the meta device PyTorch takes the math path, which saves the full attention matrix; the flash and
    memory-efficient kernels that run on GPUs (and on CPUs) keep only q, k, v, the output and the
    log-sum-exp per query row.
    """

    @staticmethod
    def forward(ctx, query, key, value):
        output = query.new_empty(*query.shape[:-1], value.shape[-1])
        logsumexp = query.new_empty(query.shape[:-1], dtype=torch.float32)
        ctx.save_for_backward(query, key, value, output, logsumexp)
        return output

    @staticmethod
    def backward(ctx, grad):  # never called: traces run forward only
        raise NotImplementedError


@contextlib.contextmanager
def fused_attention_trace():
    functional = torch.nn.functional
    original = functional.scaled_dot_product_attention

    def attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kwargs):
        return _FusedAttention.apply(query, key, value)

    functional.scaled_dot_product_attention = attention
    try:
        yield
    finally:
        functional.scaled_dot_product_attention = original


class SavedTensorCounter(contextlib.AbstractContextManager):
    """Counts the distinct storages autograd saves for backward, leaving out the parameters themselves."""

    def __init__(self, parameters):
        self._parameters = {_storage_key(p) for p in parameters}
        self._seen: dict[int, int] = {}
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self._block_start: int | None = None
        self.largest_block = 0

    @property
    def total(self) -> int:
        return sum(self._seen.values())

    def _pack(self, tensor: torch.Tensor) -> torch.Tensor:
        key = _storage_key(tensor)
        if key not in self._parameters:
            self._seen[key] = tensor.untyped_storage().nbytes()
        return tensor

    def open_block(self, module, args) -> None:
        self._block_start = self.total

    def close_block(self, module, args, output) -> None:
        if self._block_start is not None:
            self.largest_block = max(self.largest_block, self.total - self._block_start)

    def __enter__(self):
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc):
        return self._hooks.__exit__(*exc)


def _storage_key(tensor: torch.Tensor) -> int:
    # Meta tensors have no data pointer; the storage object's identity tells views of one storage apart
    # from distinct storages all the same.
    return tensor.untyped_storage()._cdata


def _bytes(parameters, dtype: torch.dtype) -> int:
    size = torch.empty((), dtype=dtype).element_size()
    return sum(p.numel() for p in parameters) * size


def _count(module) -> int:
    return sum(p.numel() for p in module.parameters())


def _any_trainable(module) -> bool:
    return any(p.requires_grad for p in module.parameters())


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
            ("method.use_8bit_adam=true (needs bitsandbytes)", replace(footprint, optimizer="adamw8bit"))
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
        options.append(("train.gradient_checkpointing=true and method.use_8bit_adam=true", both))
    if footprint.method in ("full", "dreambooth"):
        options.append(
            (
                "method=lora",
                replace(footprint, method="lora", train_text_encoder=False, prior_preservation=False),
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
