"""Load Stable Diffusion components from a hub ID, a local folder or the offline tiny model."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from sdsweep.config.methods import method_spec
from sdsweep.config.schema import Config, ModelConfig
from sdsweep.models import shapes, shapes_build, tiny
from sdsweep.models.parts import VaeUnavailableError, load_second_text_encoder, load_vae
from sdsweep.models.versions import ModelVersion, version_of_components, version_of_folder


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
    text_encoder_2: Any = None  # SDXL's second (projected) text encoder and its tokenizer
    tokenizer_2: Any = None

    @property
    def version(self) -> ModelVersion:
        """How this model is conditioned and which pipeline holds it (sdsweep.models.versions)."""
        return version_of_components(self)

    @property
    def text_encoders(self) -> list[Any]:
        return [e for e in (self.text_encoder, self.text_encoder_2) if e is not None]

    @property
    def tokenizers(self) -> list[Any]:
        return [t for t in (self.tokenizer, self.tokenizer_2) if t is not None]

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def latent_scaling(self) -> float:
        return float(self.vae.config.scaling_factor)


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


MODEL_PARTS = ("model_index.json", "unet", "vae", "text_encoder", "tokenizer", "scheduler")


def missing_model_parts(folder: Path) -> list[str]:
    """The parts of a diffusers Stable Diffusion folder that are absent (weights found late otherwise)."""
    version = version_of_folder(folder)
    parts = MODEL_PARTS + tuple(
        p for p in version.text_encoder_parts + version.tokenizer_parts if p not in MODEL_PARTS
    )
    missing = [part for part in parts if not (folder / part).exists()]
    for part in ("unet", "vae", *version.text_encoder_parts):
        sub = folder / part
        if sub.is_dir() and not any(sub.glob("*.safetensors")) and not any(sub.glob("*.bin")):
            missing.append(f"{part}/ weights")
        if sub.is_dir() and not (sub / "config.json").exists():
            missing.append(f"{part}/config.json")
    return missing


def _complete(folder: Path, setting: str) -> str:
    missing = missing_model_parts(folder)
    if missing:
        raise ModelUnavailableError(
            f"{setting}={str(folder)!r} is an incomplete diffusers model folder: missing {', '.join(missing)}. "
            "Download the whole model again (`huggingface-cli download <model id> --local-dir <folder>`) "
            "or save it with StableDiffusionPipeline.save_pretrained."
        )
    return str(folder)


HALF_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def frozen_weight_dtype(cfg: Config, device: torch.device) -> torch.dtype:
    """The dtype of the frozen VAE and text encoder: the mixed-precision dtype on CUDA, fp32 elsewhere.

    They never receive gradients, so half precision costs nothing in training quality and halves their
    memory and time (the VAE encode of a 512 px image is about half a full fine-tune step's FLOPs).
    """
    if device.type != "cuda":
        return torch.float32
    return HALF_DTYPES.get(resolve_mixed_precision(cfg.train.mixed_precision, device), torch.float32)


def sampling_dtype(setting: str, device: torch.device) -> torch.dtype:
    """``eval.dtype``: auto samples in half precision on CUDA (bf16 where supported) and fp32 on CPU."""
    if setting == "auto":
        if device.type != "cuda":
            return torch.float32
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"fp32": torch.float32, **HALF_DTYPES}[setting]


def sampling_precision(setting: str, device: torch.device):
    """A context for pipeline calls: autocast to the sampling dtype, so the live fp32 UNet is not copied."""
    import contextlib

    dtype = sampling_dtype(setting, device)
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def unavailable_features(cfg: Config, device: torch.device) -> list[str]:
    """Requested speed-ups this machine cannot provide, each naming what is missing and the fix."""
    import importlib.util
    import shutil

    problems = []
    if cfg.train.compile:
        if device.type == "cuda" and importlib.util.find_spec("triton") is None:
            problems.append("train.compile=true needs the triton package on CUDA (pip install triton)")
        if device.type == "cpu" and not any(shutil.which(cc) for cc in ("cc", "gcc", "clang")):
            problems.append(
                "train.compile=true needs a C compiler on CPU for torch.compile's inductor backend "
                "(apt-get install gcc), or train.compile=false"
            )
    if cfg.train.optimizer == "adamw8bit":  # method.use_8bit_adam=true was translated into it (normalise)
        if importlib.util.find_spec("bitsandbytes") is None:
            problems.append(
                "8-bit AdamW needs the bitsandbytes package (pip install 'sdsweep[gpu]'); "
                "or set train.optimizer=adamw"
            )
        elif device.type != "cuda":
            problems.append(f"8-bit AdamW (bitsandbytes) needs a CUDA device; this run is on {device}")
    return problems


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
        return _complete(path, "model.path")
    flavour = tiny.parse_tiny_id(model.pretrained)
    if flavour is not None:
        return str(tiny.ensure_tiny_model(flavour, cache))
    shapes_build_id = shapes.parse_shapes_model_id(model.pretrained)
    if shapes_build_id is not None:  # the known-answer shapes model (that seed's build), pretrained here once
        return str(shapes_build.ensure_shapes_model(shapes_build_id[0], cache, seed=shapes_build_id[1]))
    local = Path(os.path.expanduser(model.pretrained))
    if local.is_dir():
        return _complete(local, "model.pretrained")
    try:
        from huggingface_hub import snapshot_download

        folder = snapshot_download(
            model.pretrained,
            revision=model.revision,
            allow_patterns=[
                "model_index.json",
                "scheduler/*",
                "tokenizer/*",
                "tokenizer_2/*",
                "text_encoder/*.json",
                "text_encoder/*.safetensors",
                "text_encoder_2/*.json",
                "text_encoder_2/*.safetensors",
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
    return _complete(Path(folder), "model.pretrained")


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")


def is_hub_id(model: ModelConfig) -> bool:
    """A model that comes from the hub: not a local folder and not one of the models sdsweep builds."""
    name = model.pretrained
    built = tiny.parse_tiny_id(name) is not None or shapes.parse_shapes_id(name) is not None
    return not model.path and not built and not Path(name).expanduser().is_dir()


def model_unavailable_reason(model: ModelConfig, cache: str | None = None) -> str | None:
    """Why the model cannot be used, or None; downloads nothing (a hub ID online is only looked up).

    The offline models (``tiny:`` and ``shapes:`` IDs) are built here, never downloaded: a known flavour is
    always available (the shapes model is built on first use, minutes, unless ``make demo`` built it).
    """
    shapes_flavour = shapes.parse_shapes_id(model.pretrained)
    if shapes_flavour is not None and not model.path:
        if shapes_flavour != "sd15":
            return (
                f"{model.pretrained!r} is not a shapes model sdsweep builds (only shapes:sd15, model=shapes)"
            )
        return None
    if (
        model.path
        or tiny.parse_tiny_id(model.pretrained) is not None
        or Path(model.pretrained).expanduser().is_dir()
    ):
        try:
            resolve_model_source(model, cache)
        except (ModelUnavailableError, ValueError) as error:  # ValueError: an unknown tiny flavour
            return str(error)
        return None
    from huggingface_hub import model_info, snapshot_download

    try:
        folder = snapshot_download(model.pretrained, revision=model.revision, local_files_only=True)
        missing = missing_model_parts(Path(folder))
        if not missing:
            return None
    except Exception:
        missing = []
    if not hub_offline():
        try:
            model_info(model.pretrained, revision=model.revision, timeout=10)
            return None  # reachable: the run downloads it
        except Exception as error:
            return f"{model.pretrained!r} cannot be reached ({type(error).__name__})"
    detail = f"the cached copy lacks {', '.join(missing)}" if missing else "it is not in the local cache"
    return f"{model.pretrained!r} is not available offline ({detail})"


def load_components(
    cfg: Config, device: torch.device | None = None, weight_dtype: torch.dtype | None = None
) -> SDComponents:
    """UNet, VAE, text encoder, tokenizer and a DDPM noise scheduler, with VAE and text encoder frozen.

    The frozen parts are kept in ``weight_dtype`` (default: ``frozen_weight_dtype``); a text encoder that
    trains (textual inversion's embedding table, ``method.train_text_encoder``) and the UNet stay fp32.
    """
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    source = resolve_model_source(cfg.model, cfg.paths.cache)
    device = device or torch.device("cpu")
    weight_dtype = weight_dtype or frozen_weight_dtype(cfg, device)
    text_dtype = torch.float32 if trains_text_encoder(cfg) else weight_dtype
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
    second = load_second_text_encoder(source, variant)
    try:
        vae = load_vae(cfg.model, source)
    except VaeUnavailableError as error:
        raise ModelUnavailableError(str(error)) from None
    unet = UNet2DConditionModel.from_pretrained(source, subfolder="unet", variant=variant)
    frozen = [vae, text_encoder] + ([second[0]] if second else [])
    for module in frozen:
        module.requires_grad_(False)
        module.eval()
    # Only cast what changes dtype: diffusers warns on every .to(dtype=...) of a loaded model.
    for module, dtype in ((vae, weight_dtype), *((m, text_dtype) for m in frozen[1:])):
        module.to(device) if dtype == torch.float32 else module.to(device, dtype=dtype)
    unet.to(device)
    return SDComponents(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        noise_scheduler=noise_scheduler,
        source=source,
        prediction_type=prediction_type,
        text_encoder_2=second[0] if second else None,
        tokenizer_2=second[1] if second else None,
    )


def trains_text_encoder(cfg: Config) -> bool:
    spec = method_spec(cfg.method.name)
    return spec.trains_text_encoder(cfg.method) if spec else bool(cfg.method.train_text_encoder)


def zero_terminal_snr_scheduler(noise_scheduler, prediction_type: str):
    """The training scheduler with betas rescaled so the last timestep is pure noise (Lin et al. 2023).

    Checked here as well as in config validation because ``model.prediction_type=auto`` is only known
    once the scheduler config is read (still before any weights load).
    """
    from diffusers import DDPMScheduler

    from sdsweep.errors import ConfigError

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
    """The version's pipeline (StableDiffusionPipeline without a safety checker, or
    StableDiffusionXLPipeline) sharing the (possibly training) modules."""
    version = components.version
    pipe = version.pipeline_cls()(
        **version.pipeline_parts(components),
        scheduler=make_inference_scheduler(scheduler, components.noise_scheduler.config),
    )
    pipe.set_progress_bar_config(disable=True)
    if device is not None:
        pipe.to(device)
    return pipe


def load_pipeline(
    source: str, scheduler: str = "dpmsolver++", device: torch.device | None = None, dtype=None
):
    """Load a saved pipeline folder (base model or a full/DreamBooth trial's weights) with the pipeline
    class of its version."""
    version = version_of_folder(source)
    pipe = version.pipeline_cls().from_pretrained(source, torch_dtype=dtype, **version.load_kwargs())
    pipe.scheduler = make_inference_scheduler(scheduler, pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    if device is not None:
        pipe.to(device)
    return pipe
