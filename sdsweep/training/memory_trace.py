"""What autograd keeps for one training forward pass, counted without memory or weights.

The real diffusers and transformers modules are built on PyTorch's ``meta`` device (shapes, no storage)
from the model's own config files; the method's trainable set is marked as its ``prepare()`` would, and
one forward pass at the run's batch and resolution is traced with ``saved_tensors_hooks``, which sees
every tensor autograd saves for backward.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import torch

from sdsweep.config.methods import MethodSpec, method_spec
from sdsweep.errors import ConfigError

TOKENS = 77  # every SD prompt is padded to the CLIP context length
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


def spec_of(method: str) -> MethodSpec:
    """The registered description of ``method`` (a ConfigError for a name nothing registered)."""
    spec = method_spec(method)
    if spec is None:
        raise ConfigError(f"Unknown fine-tuning method {method!r}: no registered method has that name.")
    return spec


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
    """Set requires_grad the way the method's ``prepare()`` does (its ``mark_trainable``), so the trace
    keeps what it keeps."""
    spec_of(footprint.method).trainer_class().mark_trainable(unet, text_encoder, footprint)
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
    # nn.Module.to, not diffusers' override: on an empty meta model it only warns that "modules should be
    # kept in float32: []" on every run's memory prediction, which says nothing to the user.
    torch.nn.Module.to(unet, dtype)
    text_grad = spec_of(footprint.method).trains_text_encoder(footprint)
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
    added = meta_added_conditions(config, batch, dtype)
    with counter, fused_attention_trace():
        unet(sample, timesteps, context, added_cond_kwargs=added)
    for handle in handles:
        handle.remove()
    full, largest = counter.total, counter.largest_block
    if not footprint.gradient_checkpointing:
        return full, largest
    unet.enable_gradient_checkpointing()
    counter = SavedTensorCounter(unet.parameters())
    with counter, fused_attention_trace():
        unet(sample, timesteps, context, added_cond_kwargs=added)
    unet.disable_gradient_checkpointing()
    return counter.total, largest


def meta_added_conditions(config: dict[str, Any], batch: int, dtype: torch.dtype) -> dict[str, Any] | None:
    """SDXL's added conditions (pooled text embedding and six time_ids) as meta tensors, for a UNet whose
    config has ``addition_embed_type="text_time"``; None for SD 1.x/2.x UNets."""
    if config.get("addition_embed_type") != "text_time":
        return None
    pooled = config["projection_class_embeddings_input_dim"] - 6 * config["addition_time_embed_dim"]
    return {
        "text_embeds": torch.empty(batch, pooled, device="meta", dtype=dtype),
        "time_ids": torch.empty(batch, 6, device="meta", dtype=dtype),
    }


def build_second_text_encoder_on_meta(configs: dict[str, dict[str, Any]], footprint: TrainingFootprint):
    """SDXL's second text encoder on the meta device, marked trainable as the method's ``prepare()`` marks
    it (textual inversion: its embedding table; a full fine-tune with train_text_encoder: all of it); None
    for a one-encoder model. (LoRA adapters on the text encoders are not modelled, for either encoder.)"""
    if "text_encoder_2" not in configs:
        return None
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    with torch.device("meta"):
        encoder = CLIPTextModelWithProjection(CLIPTextConfig.from_dict(configs["text_encoder_2"]))
    encoder.requires_grad_(False)
    spec_of(footprint.method).trainer_class().mark_text_encoder(encoder, footprint)
    return encoder


def trace_text_encoder_activations(text_encoder, footprint: TrainingFootprint) -> int:
    if not any_trainable(text_encoder):
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


def any_trainable(module) -> bool:
    return any(p.requires_grad for p in module.parameters())
