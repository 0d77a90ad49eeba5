"""The GPU section of ``make bench``: full-size SD-1.5 training and sampling speed on a random-weight model.

The architecture is written here from the public SD-1.5 configs, so the numbers need no download: the
speed and memory of a step depend on the shapes, not on the weight values. Measured per method (full
fine-tune, LoRA, textual inversion), batch size and with/without the latent cache: training images/s,
peak memory and model FLOPs utilisation (MFU). Sampling: 25 DPM-Solver++ steps + VAE decode, batch 4.

Without CUDA the section is skipped (``run`` returns ``{"skipped": ...}``). ``dry_run=True`` runs every
code path on the CPU with a scaled-down architecture at 64 px, so the code is exercised where no GPU is;
its timings mean nothing.
"""

from __future__ import annotations

import copy
import gc
import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F

# Dense bf16 tensor-core peaks (FLOP/s) from the vendors' datasheets, matched against
# torch.cuda.get_device_name() in order: more specific names first (an "H100 PCIe" is not an SXM part).
PEAK_BF16_FLOPS: list[tuple[str, float]] = [
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H100", 989e12),  # SXM / "H100 80GB HBM3"
    ("H200", 989e12),
    ("GH200", 989e12),
    ("A100", 312e12),
]
METHODS = ("full", "lora", "textual_inversion")
BATCH_SIZES = (1, 4, 8)
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
TOKENS = 77  # CLIP context length; every SD prompt is padded to it


@dataclass(frozen=True)
class Arch:
    """The shapes that set the cost of a step. ``sd15()`` is the real thing; ``scaled_down()`` is for dry runs."""

    unet_channels: tuple[int, ...]
    vae_channels: tuple[int, ...]
    text_hidden: int
    text_layers: int
    text_heads: int
    vocab: int
    attention_head_dim: int
    resolution: int

    @classmethod
    def sd15(cls) -> Arch:
        return cls((320, 640, 1280, 1280), (128, 256, 512, 512), 768, 12, 12, 49408, 8, 512)

    @classmethod
    def scaled_down(cls) -> Arch:
        # Same block types and depth as SD-1.5, narrow channels: constructs and steps in seconds on a CPU.
        return cls((32, 64, 64, 64), (32, 32, 64, 64), 64, 2, 4, 1000, 8, 64)


@dataclass
class Models:
    unet: torch.nn.Module
    vae: torch.nn.Module
    text_encoder: torch.nn.Module
    scaling: float
    arch: Arch
    # bf16 on GPUs. Dry runs stay fp32: CPU bf16 kernels are orders of magnitude slower and the code
    # paths are the same either way.
    low_precision: torch.dtype = torch.bfloat16

    @property
    def amp(self) -> bool:
        return self.low_precision != torch.float32


# ---- construction -----------------------------------------------------------------------------------
def build_unet(arch: Arch) -> torch.nn.Module:
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=arch.resolution // 8,
        in_channels=4,
        out_channels=4,
        layers_per_block=2,
        block_out_channels=arch.unet_channels,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=arch.text_hidden,
        attention_head_dim=arch.attention_head_dim,
        norm_num_groups=32,
        flip_sin_to_cos=True,
        freq_shift=0,
        downsample_padding=1,
        act_fn="silu",
    )


def build_vae(arch: Arch) -> torch.nn.Module:
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=arch.vae_channels,
        layers_per_block=2,
        latent_channels=4,
        norm_num_groups=32,
        sample_size=arch.resolution,
        scaling_factor=0.18215,
    )


def build_text_encoder(arch: Arch) -> torch.nn.Module:
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(
        vocab_size=arch.vocab,
        hidden_size=arch.text_hidden,
        intermediate_size=4 * arch.text_hidden,
        num_hidden_layers=arch.text_layers,
        num_attention_heads=arch.text_heads,
        max_position_embeddings=TOKENS,
        hidden_act="quick_gelu",
        projection_dim=arch.text_hidden,
    )
    return CLIPTextModel(config)


def build_models(arch: Arch, device: torch.device, low_precision: torch.dtype = torch.bfloat16) -> Models:
    """Random weights; VAE frozen in bf16 (as sdsweep runs it on GPUs), UNet and text encoder fp32 masters."""
    torch.manual_seed(0)
    vae = build_vae(arch).to(device, low_precision).eval().requires_grad_(False)
    text_encoder = build_text_encoder(arch).to(device).eval().requires_grad_(False)
    unet = build_unet(arch).to(device).train()
    return Models(unet, vae, text_encoder, float(vae.config.scaling_factor), arch, low_precision)


def noise_scheduler():
    from diffusers import DDPMScheduler

    # SD-1.5's training betas.
    return DDPMScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear"
    )


# ---- device helpers (no-ops on the CPU so dry runs share the code) ------------------------------------
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device) / 2**30


def autocast(models: Models, device: torch.device) -> AbstractContextManager:
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=models.amp)


def peak_flops(device_name: str) -> float | None:
    for fragment, flops in PEAK_BF16_FLOPS:
        if fragment.lower() in device_name.lower():
            return flops
    return None


# ---- FLOPs ------------------------------------------------------------------------------------------
def unet_forward_flops(models: Models, device: torch.device) -> float:
    """FLOPs of one UNet forward for one image (counted on batch 1; the UNet is linear in batch size)."""
    from torch.utils.flop_counter import FlopCounterMode

    arch = models.arch
    latent = arch.resolution // 8
    sample = torch.randn(1, 4, latent, latent, device=device)
    text = torch.randn(1, TOKENS, arch.text_hidden, device=device)
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), autocast(models, device), counter:
        models.unet(sample, torch.tensor([500], device=device), text, return_dict=False)
    return float(counter.get_total_flops())


# ---- one training step --------------------------------------------------------------------------------
@dataclass
class StepInputs:
    """What a step reads: pixels + token ids (no cache) or latents + embeddings (latent cache)."""

    pixels: torch.Tensor | None
    ids: torch.Tensor
    latents: torch.Tensor | None
    embeddings: torch.Tensor | None


def make_inputs(
    models: Models, batch: int, cached: bool, frozen_text: bool, device: torch.device
) -> StepInputs:
    arch = models.arch
    ids = torch.randint(0, arch.vocab, (batch, TOKENS), device=device)
    if not cached:
        pixels = torch.rand(batch, 3, arch.resolution, arch.resolution, device=device) * 2 - 1
        return StepInputs(pixels, ids, None, None)
    latent = arch.resolution // 8
    latents = torch.randn(batch, 4, latent, latent, device=device) * models.scaling
    # The cache stores text embeddings only when the text encoder is frozen (not for textual inversion).
    embeddings = None
    if frozen_text:
        with torch.no_grad(), autocast(models, device):
            embeddings = models.text_encoder(ids, return_dict=False)[0].float()
    return StepInputs(None, ids, latents, embeddings)


def training_step(
    models: Models, scheduler, optimizer: torch.optim.Optimizer, inputs: StepInputs, text_trainable: bool
) -> torch.Tensor:
    """sdsweep's step: (VAE encode) -> (text encode) -> noise -> UNet -> MSE -> backward -> AdamW."""
    with autocast(models, inputs.ids.device):
        if inputs.latents is None:
            with torch.no_grad():
                latents = models.vae.encode(inputs.pixels.to(models.low_precision)).latent_dist.sample()
                latents = latents.float() * models.scaling
        else:
            latents = inputs.latents
        if inputs.embeddings is None:
            with torch.set_grad_enabled(text_trainable):
                embeddings = models.text_encoder(inputs.ids, return_dict=False)[0]
        else:
            embeddings = inputs.embeddings
        noise = torch.randn_like(latents)
        timesteps = torch.randint(0, 1000, (latents.shape[0],), device=latents.device)
        noisy = scheduler.add_noise(latents, noise, timesteps)
        prediction = models.unet(noisy, timesteps, embeddings, return_dict=False)[0]
    loss = F.mse_loss(prediction.float(), noise.float())
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.detach()


# ---- methods ------------------------------------------------------------------------------------------
def set_method(models: Models, method: str) -> tuple[list[torch.nn.Parameter], bool]:
    """Freeze/unfreeze for a method; returns (trainable parameters, text encoder trainable)."""
    models.unet.requires_grad_(False)
    models.text_encoder.requires_grad_(False)
    if method == "full":
        models.unet.requires_grad_(True)
        return list(models.unet.parameters()), False
    if method == "textual_inversion":
        # Only the token-embedding matrix trains, but gradients flow back through the whole UNet to it.
        embedding = models.text_encoder.get_input_embeddings().weight
        embedding.requires_grad_(True)
        return [embedding], True
    if method == "lora":
        add_lora(models.unet)
        return [p for p in models.unet.parameters() if p.requires_grad], False
    raise ValueError(f"unknown method {method!r}; known: {METHODS}")


def add_lora(unet: torch.nn.Module, rank: int = 4) -> None:
    """sdsweep's LoRA: peft adapters on the attention projections, added once (later calls reuse them)."""
    from peft import LoraConfig

    if not getattr(unet, "_hf_peft_config_loaded", False):
        unet.add_adapter(
            LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian", target_modules=LORA_TARGETS)
        )
    for name, parameter in unet.named_parameters():
        parameter.requires_grad_("lora_" in name)


# ---- timing -------------------------------------------------------------------------------------------
def timed_steps(step: Callable[[], Any], device: torch.device, warmup: int, steps: int) -> list[float]:
    """Seconds per step after ``warmup`` untimed steps (allocator and cuDNN autotuning settle there)."""
    for _ in range(warmup):
        step()
    sync(device)
    times = []
    for _ in range(steps):
        tick = time.perf_counter()
        step()
        sync(device)
        times.append(time.perf_counter() - tick)
    return times


def training_case(
    models: Models,
    method: str,
    batch: int,
    cached: bool,
    device: torch.device,
    forward_flops: float,
    peak: float | None,
    warmup: int,
    steps: int,
) -> dict[str, Any]:
    """One row of the training table: images/s, peak memory and MFU for (method, batch, cache)."""
    params, text_trainable = set_method(models, method)
    optimizer = torch.optim.AdamW(
        params, lr=1e-6, weight_decay=0.0 if method == "textual_inversion" else 1e-2
    )
    scheduler = noise_scheduler()
    row: dict[str, Any] = {"method": method, "batch_size": batch, "latent_cache": cached}
    reset_peak(device)
    try:
        inputs = make_inputs(models, batch, cached, frozen_text=not text_trainable, device=device)
        times = timed_steps(
            lambda: training_step(models, scheduler, optimizer, inputs, text_trainable), device, warmup, steps
        )
    except torch.OutOfMemoryError as error:
        row["error"] = f"out of memory: {str(error).splitlines()[0]}"
        return row
    finally:
        optimizer.zero_grad(set_to_none=True)  # frees the gradients before the next row's peak is measured
    seconds = statistics.median(times)
    # Model FLOPs: a full fine-tune computes weight and activation gradients (~3x the forward); LoRA and
    # textual inversion skip the frozen weights' gradients (~2x). VAE and text encoder are not counted.
    factor = 3.0 if method == "full" else 2.0
    achieved = factor * forward_flops * batch / seconds
    row.update(
        seconds_per_step=seconds,
        images_per_second=batch / seconds,
        peak_memory_gib=peak_gib(device),
        trainable_parameters=sum(p.numel() for p in params),
        achieved_tflops=achieved / 1e12,
        mfu=achieved / peak if peak else None,
    )
    return row


# ---- sampling -----------------------------------------------------------------------------------------
def sample_images(
    unet: torch.nn.Module, models: Models, ids: torch.Tensor, steps: int, guidance: float = 7.5
) -> torch.Tensor:
    """What the evaluation does per batch: text encode, CFG denoising with DPM-Solver++, VAE decode."""
    from diffusers import DPMSolverMultistepScheduler

    device = ids.device
    scheduler = DPMSolverMultistepScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        algorithm_type="dpmsolver++",
    )
    scheduler.set_timesteps(steps, device=device)
    batch, latent = ids.shape[0], models.arch.resolution // 8
    with torch.no_grad(), autocast(models, device):
        conditional = models.text_encoder(ids, return_dict=False)[0]
        unconditional = models.text_encoder(torch.zeros_like(ids), return_dict=False)[0]
        embeddings = torch.cat([unconditional, conditional])
        latents = torch.randn(batch, 4, latent, latent, device=device) * scheduler.init_noise_sigma
        for t in scheduler.timesteps:
            model_input = scheduler.scale_model_input(torch.cat([latents] * 2), t)
            uncond, cond = unet(model_input, t, embeddings, return_dict=False)[0].chunk(2)
            latents = scheduler.step(uncond + guidance * (cond - uncond), t, latents, return_dict=False)[0]
        images = models.vae.decode(latents.to(models.low_precision) / models.scaling, return_dict=False)[0]
    return images


def sampling_case(
    models: Models,
    device: torch.device,
    forward_flops: float,
    peak: float | None,
    batch: int,
    steps: int,
    repeats: int,
) -> dict[str, Any]:
    """Images/s of evaluation sampling on a bf16 copy of the UNet (how evaluation pipelines run it)."""
    unet = copy.deepcopy(models.unet).to(models.low_precision).eval().requires_grad_(False)
    ids = torch.randint(0, models.arch.vocab, (batch, TOKENS), device=device)
    reset_peak(device)
    times = timed_steps(lambda: sample_images(unet, models, ids, steps), device, warmup=1, steps=repeats)
    seconds = statistics.median(times)
    achieved = 2 * batch * steps * forward_flops / seconds  # CFG doubles the UNet batch
    return {
        "scheduler": "dpmsolver++",
        "num_inference_steps": steps,
        "batch_size": batch,
        "seconds_per_batch": seconds,
        "images_per_second": batch / seconds,
        "peak_memory_gib": peak_gib(device),
        "achieved_tflops": achieved / 1e12,
        "mfu": achieved / peak if peak else None,
    }


# ---- the section --------------------------------------------------------------------------------------
@dataclass
class GpuPlan:
    arch: Arch
    batch_sizes: tuple[int, ...]
    warmup: int
    steps: int
    sample_steps: int
    sample_batch: int
    sample_repeats: int


def plan_for(dry_run: bool, quick: bool) -> GpuPlan:
    if dry_run:
        return GpuPlan(
            Arch.scaled_down(), (1,), warmup=1, steps=1, sample_steps=2, sample_batch=1, sample_repeats=1
        )
    if quick:
        return GpuPlan(
            Arch.sd15(), (1, 4), warmup=2, steps=3, sample_steps=25, sample_batch=4, sample_repeats=1
        )
    return GpuPlan(
        Arch.sd15(), BATCH_SIZES, warmup=3, steps=10, sample_steps=25, sample_batch=4, sample_repeats=3
    )


def cases(plan: GpuPlan) -> Iterator[tuple[str, int, bool]]:
    # LoRA last: its adapters stay in the UNet once added.
    for method in ("full", "textual_inversion", "lora"):
        for batch in plan.batch_sizes:
            for cached in (False, True):
                yield method, batch, cached


def run(dry_run: bool = False, quick: bool = False, log: Callable[[str], None] = print) -> dict[str, Any]:
    """The GPU section's JSON; ``{"skipped": reason}`` without CUDA unless ``dry_run``."""
    if not dry_run and not torch.cuda.is_available():
        return {
            "skipped": f"no CUDA device: torch {torch.__version__} reports torch.cuda.is_available() == False"
        }
    device = torch.device("cpu") if dry_run else torch.device("cuda")
    plan = plan_for(dry_run, quick)
    name = "cpu (dry run)" if dry_run else torch.cuda.get_device_name(device)
    peak = None if dry_run else peak_flops(name)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # what sdsweep sets (train.allow_tf32)
        torch.backends.cudnn.allow_tf32 = True
    started = time.perf_counter()
    models = build_models(plan.arch, device, torch.float32 if dry_run else torch.bfloat16)
    log(
        f"gpu: built {'scaled-down' if dry_run else 'SD-1.5'} models on {name} in {time.perf_counter() - started:.1f}s"
    )
    forward_flops = unet_forward_flops(models, device)
    out: dict[str, Any] = {
        "device_name": name,
        "dry_run": dry_run,
        "arch": asdict(plan.arch),
        "resolution": plan.arch.resolution,
        "precision": "bf16 autocast (fp32 master weights; VAE bf16)",
        "peak_bf16_flops": peak,
        "unet_forward_gflops_per_image": forward_flops / 1e9,
        "unet_parameters": sum(p.numel() for p in models.unet.parameters()),
        "sampling": sampling_case(
            models, device, forward_flops, peak, plan.sample_batch, plan.sample_steps, plan.sample_repeats
        ),
        "training": [],
    }
    if peak is None and not dry_run:
        out["mfu_note"] = f"no peak bf16 FLOP/s known for {name!r}; only achieved TFLOP/s is reported"
    for method, batch, cached in cases(plan):
        row = training_case(
            models, method, batch, cached, device, forward_flops, peak, plan.warmup, plan.steps
        )
        log(f"gpu: {method} batch {batch} cache={cached}: " + _short(row))
        out["training"].append(row)
    out["seconds"] = time.perf_counter() - started
    return out


def _short(row: dict[str, Any]) -> str:
    if "error" in row:
        return row["error"]
    memory = row["peak_memory_gib"]
    return f"{row['images_per_second']:.2f} img/s" + (f", {memory:.1f} GiB" if memory is not None else "")


__all__ = ["run", "Arch", "build_models", "peak_flops", "PEAK_BF16_FLOPS"]


if __name__ == "__main__":  # a quick check: python -m sdsweep.bench_gpu [--dry-run]
    import json
    import sys

    result = run(dry_run="--dry-run" in sys.argv, quick="--quick" in sys.argv)
    print(json.dumps(result, indent=2, default=str))
