"""The training-path section of ``make bench``: sdsweep's own loading, methods, ``train()`` and sampling, timed.

Nothing here re-implements a training step. Each case composes a real config, loads the model through
``load_components`` (frozen parts in the weight dtype, as a trial does), prepares the method, builds the
dataset through the latent cache or not, and runs ``train()``; sampling goes through the method's evaluation
pipeline under ``sampling_precision``, as the evaluator does.

* On CUDA the model is a full-size SD-1.5 architecture with random weights at 512 px, written once as a
  diffusers folder from the public SD-1.5 configs: the speed and memory of a step depend on the shapes,
  not on the weight values.
* Without CUDA the same code runs on the tiny model at its own resolution, so this path is exercised in CI
  and cannot rot. Those timings describe the tiny model on a CPU and nothing else.

FLOPs are counted, not estimated: ``FlopCounterMode`` over one real training step (forward and backward)
of each method, split into UNet, VAE and text encoder. MFU is reported for the UNet alone and end to end.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

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
SD15_UNET = dict(
    sample_size=64,
    block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    layers_per_block=2,
    cross_attention_dim=768,
    attention_head_dim=8,
)
SD15_VAE = dict(
    block_out_channels=(128, 256, 512, 512),
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    layers_per_block=2,
    latent_channels=4,
    sample_size=512,
)
SD15_TEXT = dict(
    hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, vocab_size=49408
)


@dataclass(frozen=True)
class Case:
    method: str
    batch_size: int
    gradient_checkpointing: bool = False
    latent_cache: bool = True
    eight_bit_adam: bool = False

    def overrides(self) -> list[str]:
        return [
            f"method={self.method}",
            f"train.train_batch_size={self.batch_size}",
            f"train.gradient_checkpointing={str(self.gradient_checkpointing).lower()}",
            f"train.use_latent_cache={str(self.latent_cache).lower()}",
            f"train.optimizer={'adamw8bit' if self.eight_bit_adam else 'adamw'}",
        ]


@dataclass(frozen=True)
class Plan:
    on_gpu: bool
    steps: int
    warmup: int
    cases: tuple[Case, ...]
    eval_images: int
    eval_steps: int


def plan_for(on_gpu: bool, quick: bool) -> Plan:
    if not on_gpu:  # the tiny model on CPU: every code path, a few steps each
        cases = tuple(Case(m, 2) for m in METHODS) + (Case("full", 2, latent_cache=False),)
        return Plan(False, steps=3, warmup=1, cases=cases, eval_images=2, eval_steps=3)
    batches = (1, 4) if quick else (1, 4, 8)
    cases = [Case(m, b, latent_cache=c) for m in METHODS for b in batches for c in (True, False)]
    cases += [Case(m, b, gradient_checkpointing=True) for m in METHODS for b in batches]
    cases += [
        Case(m, b, gradient_checkpointing=True, eight_bit_adam=True) for m in ("full",) for b in batches
    ]
    return Plan(True, steps=10 if quick else 20, warmup=3, cases=tuple(cases), eval_images=4, eval_steps=25)


# ---- the model --------------------------------------------------------------------------------------------
def sd15_random_folder(root: Path) -> Path:
    """A diffusers folder with the SD-1.5 architecture and random weights (plus the tiny tokenizer: its ids
    fall inside SD's vocabulary, and tokenization costs nothing on the device)."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from sdsweep.models import tiny

    folder = root / "sd15-random"
    if (folder / "model_index.json").exists():
        return folder
    torch.manual_seed(0)
    UNet2DConditionModel(**SD15_UNET).save_pretrained(folder / "unet")
    AutoencoderKL(**SD15_VAE).save_pretrained(folder / "vae")
    CLIPTextModel(CLIPTextConfig(**SD15_TEXT)).save_pretrained(folder / "text_encoder")
    tiny_folder = tiny.ensure_tiny_model("sd15")
    CLIPTokenizer.from_pretrained(tiny_folder, subfolder="tokenizer").save_pretrained(folder / "tokenizer")
    DDPMScheduler.from_pretrained(tiny_folder, subfolder="scheduler").save_pretrained(folder / "scheduler")
    (folder / "model_index.json").write_text((tiny_folder / "model_index.json").read_text())
    return folder


def compose_case(case: Case, model_overrides: list[str]):
    from sdsweep.config.compose import compose_typed

    return compose_typed(
        ["data=demo", "tracking=none", "eval=tiny", "train.log_every=1", *model_overrides, *case.overrides()]
    )


# ---- measuring ----------------------------------------------------------------------------------------------
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((flops for key, flops in PEAK_BF16_FLOPS if key in name), None)


def step_flops(method: Any, batch: dict[str, Any]) -> dict[str, float]:
    """FLOPs of one real training step (forward and backward), by the module that spent them."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        loss, _ = method.compute_loss(method.augment_batch(batch))
        loss.backward()
    for parameter in method.trainable_parameters():
        parameter.grad = None
    counts = {name: sum(ops.values()) for name, ops in counter.get_flop_counts().items()}
    total = float(counter.get_total_flops())
    unet = float(counts.get("UNet2DConditionModel", 0))
    text = float(counts.get("CLIPTextModel", 0))
    return {"total": total, "unet": unet, "text_encoder": text, "vae": max(0.0, total - unet - text)}


def first_batch(dataset: Any, batch_size: int) -> dict[str, Any]:
    from sdsweep.training.batches import infinite_batches

    return next(infinite_batches(dataset, batch_size, seed=0))


def training_case(
    case: Case, model_overrides: list[str], plan: Plan, device: torch.device, cache_dir: Path
) -> dict:
    from sdsweep.data.examples import load_examples, split_examples
    from sdsweep.data.latent_cache import build_training_dataset
    from sdsweep.models.loading import load_components
    from sdsweep.training.memory import estimate_for_config
    from sdsweep.training.methods import get_method
    from sdsweep.training.train import train

    cfg = compose_case(case, model_overrides)
    cfg.train.max_train_steps = plan.warmup + plan.steps
    predicted = estimate_for_config(cfg, device)
    components = load_components(cfg, device)
    method = get_method(cfg.method.name)(cfg, components, device, cache_dir=cache_dir)
    method.prepare()
    examples, _ = split_examples(load_examples(cfg), cfg.data.num_heldout)
    dataset = build_training_dataset(cfg, components, method, examples, cache_dir)
    flops = step_flops(method, first_batch(dataset, case.batch_size))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    result = train(cfg, method, dataset, [plan.warmup + plan.steps])
    sync(device)
    seconds = statistics.median(result.step_seconds[plan.warmup :])
    peak = peak_flops(device)
    row = {
        **case.__dict__,
        "images_per_second": case.batch_size / seconds,
        "step_seconds": seconds,
        "flops_per_step": flops,
        "achieved_tflops": flops["total"] / seconds / 1e12,
        "mfu_end_to_end": flops["total"] / seconds / peak if peak else None,
        "mfu_unet": flops["unet"] / seconds / peak if peak else None,
        "vae_and_text_share_of_flops": (flops["vae"] + flops["text_encoder"]) / flops["total"],
        "predicted_peak_gib": round(predicted.total / 2**30, 3),
        "measured_peak_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 3)
        if device.type == "cuda"
        else None,
    }
    del method, components, dataset
    return row


def sampling_case(model_overrides: list[str], plan: Plan, device: torch.device, dtype: str) -> dict:
    from sdsweep.models.loading import load_components, sampling_dtype, sampling_precision
    from sdsweep.training.methods import get_method

    cfg = compose_case(Case("full", 1), model_overrides + [f"eval.dtype={dtype}"])
    components = load_components(cfg, device)
    method = get_method("full")(cfg, components, device)
    method.prepare()
    pipe = method.pipeline_for_eval(cfg.eval.scheduler)
    prompts = ["a photo of sks"] * plan.eval_images
    resolution = cfg.model.resolution

    def sample() -> None:
        with torch.no_grad(), sampling_precision(dtype, device):
            pipe(
                prompts,
                num_inference_steps=plan.eval_steps,
                height=resolution,
                width=resolution,
                generator=torch.Generator("cpu").manual_seed(0),
            )

    sample()  # warm-up: kernels, allocator
    sync(device)
    start = time.perf_counter()
    sample()
    sync(device)
    seconds = time.perf_counter() - start
    return {
        "dtype": str(sampling_dtype(dtype, device)).removeprefix("torch."),
        "images": plan.eval_images,
        "num_inference_steps": plan.eval_steps,
        "images_per_second": plan.eval_images / seconds,
    }


def run(
    quick: bool = False,
    log: Callable[[str], None] = print,
    workdir: Path | None = None,
    dry_run: bool = False,
) -> dict[str, Any]:
    """Every case of the plan on this machine's device; a failing case is recorded with its error.

    ``dry_run`` runs the CPU plan (the tiny model) even where CUDA is available: every code path in
    about a minute, before paying for the full-size one. Its numbers mean nothing.
    """
    on_gpu = torch.cuda.is_available() and not dry_run
    device = torch.device("cuda" if on_gpu else "cpu")
    plan = plan_for(device.type == "cuda", quick)
    workdir = Path(workdir or tempfile.mkdtemp(prefix="sdsweep-bench-gpu-"))
    if plan.on_gpu:
        folder = sd15_random_folder(workdir)
        model_overrides = [f"model.path={folder}", "model.resolution=512", "model.name=sd15-random"]
    else:
        model_overrides = ["model=tiny"]
    rows = []
    for case in plan.cases:
        log(f"  training {case}")
        try:
            rows.append(training_case(case, model_overrides, plan, device, workdir / "cache"))
        except Exception as error:  # an OOM at batch 8 is a result, not the end of the bench
            rows.append({**case.__dict__, "error": f"{type(error).__name__}: {str(error)[:300]}"})
        if device.type == "cuda":
            torch.cuda.empty_cache()
    sampling = []
    for dtype in ("fp32", "auto"):
        try:
            sampling.append(sampling_case(model_overrides, plan, device, dtype))
        except Exception as error:
            sampling.append({"dtype": dtype, "error": f"{type(error).__name__}: {str(error)[:300]}"})
    return {
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "model": "SD-1.5 architecture, random weights, 512 px"
        if plan.on_gpu
        else "tiny (CPU: timings describe nothing real)",
        "measured_on_gpu": plan.on_gpu,
        "dry_run": dry_run,
        "training": rows,
        "sampling": sampling,
    }


def main(argv: list[str] | None = None) -> int:
    """``python -m bench.gpu [--quick] [--dry-run]``: this section alone, its table printed, no JSON."""
    import argparse

    from bench.table import gpu_lines

    parser = argparse.ArgumentParser(prog="python -m bench.gpu", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer batch sizes and steps on CUDA")
    parser.add_argument("--dry-run", action="store_true", help="the CPU plan (tiny model) even on CUDA")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="sdsweep-bench-gpu-") as tmp:
        section = run(quick=args.quick, workdir=Path(tmp), dry_run=args.dry_run)
    print("\n".join(gpu_lines(section)))
    return 1 if any("error" in row for row in section["training"] + section["sampling"]) else 0


if __name__ == "__main__":
    raise SystemExit(main())
