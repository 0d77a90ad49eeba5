"""Load Stable Diffusion components from a hub ID, a local folder or the offline tiny model."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from sdsweep import tiny
from sdsweep.config import Config, ModelConfig


class ModelUnavailableError(RuntimeError):
    """The weights could not be found locally or downloaded."""


@dataclass
class SDComponents:
    unet: Any
    vae: Any
    text_encoder: Any
    tokenizer: Any
    noise_scheduler: Any  # DDPMScheduler with the model's training betas and prediction type
    source: str  # the folder the weights came from
    prediction_type: str  # epsilon | v_prediction

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def latent_scaling(self) -> float:
        return float(self.vae.config.scaling_factor)


def tokenize_prompts(tokenizer, prompts: list[str]) -> torch.Tensor:
    """Input ids padded to the tokenizer's 77 tokens, the length SD's text encoder was trained on."""
    return tokenizer(
        prompts,
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids


def select_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def resolve_mixed_precision(setting: str, device: torch.device) -> str:
    """auto -> bf16 on GPUs that support it (fp16 otherwise), no on CPU."""
    if device.type != "cuda":
        return "no"
    if setting != "auto":
        return setting
    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


def resolve_model_source(model: ModelConfig, cache: str | None = None) -> str:
    """The local folder holding the model's diffusers files, downloading only when allowed.

    Raises ``ModelUnavailableError`` with the fix when a hub ID cannot be reached (offline, gated, typo).
    """
    if model.path:
        path = Path(os.path.expanduser(model.path))
        if not (path / "model_index.json").exists() and not (path / "unet").is_dir():
            raise ModelUnavailableError(
                f"model.path={model.path!r} is not a diffusers model folder (no model_index.json or unet/ inside). "
                "Point model.path at a folder saved with StableDiffusionPipeline.save_pretrained or downloaded "
                "with `huggingface-cli download <model id> --local-dir <folder>`."
            )
        return str(path)
    flavour = tiny.parse_tiny_id(model.pretrained)
    if flavour is not None:
        return str(tiny.ensure_tiny_model(flavour, cache))
    local = Path(os.path.expanduser(model.pretrained))
    if local.is_dir():
        return str(local)
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(
            model.pretrained,
            revision=model.revision,
            allow_patterns=[
                "model_index.json",
                "scheduler/*",
                "tokenizer/*",
                "text_encoder/*.json",
                "text_encoder/*.safetensors",
                "unet/*.json",
                "unet/*.safetensors",
                "vae/*.json",
                "vae/*.safetensors",
                "feature_extractor/*",
            ],
        )
    except Exception as error:  # offline, gated, renamed or misspelt: all need the same fix
        offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
        why = (
            "HF_HUB_OFFLINE is set and it is not in the local cache" if offline else f"{type(error).__name__}"
        )
        raise ModelUnavailableError(
            f"Model {model.pretrained!r} could not be downloaded ({why}). Download it once on a machine with "
            f"network access (`huggingface-cli download {model.pretrained} --local-dir /models/{model.name}`) "
            f"and run with model.path=/models/{model.name}; or use model=tiny for the offline demo model."
        ) from None


def load_components(
    cfg: Config, device: torch.device | None = None, weight_dtype: torch.dtype = torch.float32
) -> SDComponents:
    """UNet, VAE, text encoder, tokenizer and a DDPM noise scheduler, with VAE and text encoder frozen."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    source = resolve_model_source(cfg.model, cfg.paths.cache)
    device = device or torch.device("cpu")
    variant = cfg.model.variant
    noise_scheduler = DDPMScheduler.from_pretrained(source, subfolder="scheduler")
    prediction_type = cfg.model.prediction_type
    if prediction_type == "auto":
        prediction_type = noise_scheduler.config.prediction_type
    else:
        noise_scheduler.register_to_config(prediction_type=prediction_type)
    if cfg.train.zero_terminal_snr:
        noise_scheduler = zero_terminal_snr_scheduler(noise_scheduler, prediction_type)
    tokenizer = CLIPTokenizer.from_pretrained(source, subfolder="tokenizer")
    text_encoder = CLIPTextModel.from_pretrained(source, subfolder="text_encoder", variant=variant)
    vae = AutoencoderKL.from_pretrained(source, subfolder="vae", variant=variant)
    unet = UNet2DConditionModel.from_pretrained(source, subfolder="unet", variant=variant)
    for module in (vae, text_encoder):
        module.requires_grad_(False)
        module.eval()
    for module in (vae, text_encoder):
        module.to(device) if weight_dtype == torch.float32 else module.to(device, dtype=weight_dtype)
    unet.to(device)
    return SDComponents(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        noise_scheduler=noise_scheduler,
        source=source,
        prediction_type=prediction_type,
    )


def zero_terminal_snr_scheduler(noise_scheduler, prediction_type: str):
    """The training scheduler with betas rescaled so the last timestep is pure noise (Lin et al. 2023).

    Checked here as well as in config validation because ``model.prediction_type=auto`` is only known
    once the scheduler config is read (still before any weights load).
    """
    from diffusers import DDPMScheduler

    from sdsweep.config import ConfigError

    if prediction_type != "v_prediction":
        raise ConfigError(
            f"Invalid config value train.zero_terminal_snr=true: this model predicts {prediction_type}, "
            "which cannot denoise from pure noise (alpha-bar is 0 at the last step). Use a v-prediction "
            "model (e.g. model=sd21 or model=tiny_sd21), set model.prediction_type=v_prediction, or turn "
            "zero_terminal_snr off."
        )
    return DDPMScheduler.from_config(noise_scheduler.config, rescale_betas_zero_snr=True)


def make_inference_scheduler(name: str, base_config: dict, zero_terminal_snr: bool = False):
    """The sampler used for evaluation; DPM-Solver++ gives PNDM-50 quality in about 25 steps.

    With ``zero_terminal_snr`` the sampler uses the rescaled betas and trailing timestep spacing, so
    sampling starts at the last (pure-noise) timestep the model was trained on.
    """
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler, PNDMScheduler

    # As keyword arguments, not merged into the config: from_config drops keys the source config
    # marks as defaults (``_use_default_values``), which a stock SD scheduler config does for these.
    zero_snr = {}
    if zero_terminal_snr or base_config.get("rescale_betas_zero_snr", False):
        zero_snr = {"rescale_betas_zero_snr": True, "timestep_spacing": "trailing"}
        if name == "pndm":
            # PNDM has no zero-SNR mode (config validation refuses eval.scheduler=pndm); a saved
            # pipeline folder gets DDIM so that it samples with the schedule it was trained on.
            return DDIMScheduler.from_config(base_config, **zero_snr)
    if name == "dpmsolver++":
        return DPMSolverMultistepScheduler.from_config(base_config, algorithm_type="dpmsolver++", **zero_snr)
    if name == "ddim":
        return DDIMScheduler.from_config(base_config, **zero_snr)
    if name == "euler":
        return EulerDiscreteScheduler.from_config(base_config, **zero_snr)
    return PNDMScheduler.from_config(base_config, skip_prk_steps=True)


def build_pipeline(
    components: SDComponents, scheduler: str = "dpmsolver++", device: torch.device | None = None
):
    """A StableDiffusionPipeline sharing the (possibly training) modules, without a safety checker."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(
        unet=components.unet,
        vae=components.vae,
        text_encoder=components.text_encoder,
        tokenizer=components.tokenizer,
        scheduler=make_inference_scheduler(scheduler, components.noise_scheduler.config),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    if device is not None:
        pipe.to(device)
    return pipe


def load_pipeline(
    source: str, scheduler: str = "dpmsolver++", device: torch.device | None = None, dtype=None
):
    """Load a saved pipeline folder (base model or a full/DreamBooth trial's weights)."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(
        source, safety_checker=None, feature_extractor=None, requires_safety_checker=False, torch_dtype=dtype
    )
    pipe.scheduler = make_inference_scheduler(scheduler, pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    if device is not None:
        pipe.to(device)
    return pipe
