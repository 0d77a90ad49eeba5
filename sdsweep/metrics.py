"""Image metrics as plain functions and small modules: CLIP score, FID/KID, CLIP-I, appropriateness.

FID and KID are computed from feature matrices, so reference features can be cached once per study
and the feature extractor is injectable (Inception for real users, CLIP or a test module offline).
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image


class MetricUnavailable(RuntimeError):
    """A metric cannot be computed here; recorded as missing with this reason."""


# ---- CLIP -------------------------------------------------------------------------------------------
def _feature_clip_class():
    from transformers import CLIPModel

    class FeatureCLIPModel(CLIPModel):
        """transformers 5 returns output objects from get_*_features; torchmetrics wants tensors."""

        def get_image_features(self, *args, **kwargs):
            out = super().get_image_features(*args, **kwargs)
            return out if isinstance(out, torch.Tensor) else out.pooler_output

        def get_text_features(self, *args, **kwargs):
            out = super().get_text_features(*args, **kwargs)
            return out if isinstance(out, torch.Tensor) else out.pooler_output

    return FeatureCLIPModel


def load_clip(name: str, cache: str | None = None, device: torch.device | None = None):
    """(model, processor) for "tiny" (offline), a local folder or a hub ID; a clear error offline."""
    from transformers import CLIPProcessor

    if name == "tiny":
        from sdsweep import tiny

        source = str(tiny.ensure_tiny_clip(cache))
    else:
        source = os.path.expanduser(name)
    try:
        model = _feature_clip_class().from_pretrained(source).eval()
        processor = CLIPProcessor.from_pretrained(source)
    except Exception as error:
        raise MetricUnavailable(
            f"CLIP model {name!r} could not be loaded ({type(error).__name__}); offline it must already be in the "
            "Hugging Face cache. Download it once, or set eval.clip_model to a local folder, or eval.clip_model=tiny."
        ) from None
    return model.to(device or "cpu"), processor


def images_to_uint8(images: list[Image.Image]) -> torch.Tensor:
    return torch.stack([torch.from_numpy(np.asarray(i.convert("RGB"))).permute(2, 0, 1) for i in images])


def clip_score(model, processor, images: list[Image.Image], prompts: list[str]) -> float:
    """torchmetrics CLIPScore (100 x cosine, clipped at 0), averaged over images."""
    from torchmetrics.multimodal.clip_score import CLIPScore

    metric = CLIPScore(model_name_or_path=lambda: (model, processor))
    metric.update(images_to_uint8(images), prompts)
    return float(metric.compute())


@torch.no_grad()
def clip_image_embeddings(model, processor, images: list[Image.Image]) -> torch.Tensor:
    inputs = processor(images=[i.convert("RGB") for i in images], return_tensors="pt")
    pixel_values = inputs["pixel_values"].to(next(model.parameters()).device)
    features = model.get_image_features(pixel_values=pixel_values)
    return torch.nn.functional.normalize(features.float(), dim=-1).cpu()


def clip_i(model, processor, generated: list[Image.Image], instances: list[Image.Image]) -> float:
    """Subject fidelity: mean cosine similarity of every generated image to every instance image."""
    a = clip_image_embeddings(model, processor, generated)
    b = clip_image_embeddings(model, processor, instances)
    return float((a @ b.T).mean())


class CLIPImageFeatures(torch.nn.Module):
    """uint8 images [N,3,H,W] -> CLIP image embeddings; a FID/KID feature extractor without downloads."""

    def __init__(self, model, processor):
        super().__init__()
        self.model, self.processor = model, processor
        self.num_features = int(model.config.projection_dim)
        self.name = f"clip:{getattr(model.config, '_name_or_path', '') or 'local'}"

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        pil = [Image.fromarray(i.permute(1, 2, 0).cpu().numpy()) for i in images]
        inputs = self.processor(images=pil, return_tensors="pt")
        out = self.model.get_image_features(pixel_values=inputs["pixel_values"].to(next(self.model.parameters()).device))
        return out.float().cpu()


def inception_features() -> torch.nn.Module:
    """The standard FID Inception network (needs torch-fidelity and its weights on the user's machine)."""
    if importlib.util.find_spec("torch_fidelity") is None:
        raise MetricUnavailable("eval.fid_features=inception needs torch-fidelity (and its Inception weights)")
    from torchmetrics.image.fid import NoTrainInceptionV3

    module = NoTrainInceptionV3(name="inception-v3-compat", features_list=["2048"])
    module.num_features = 2048
    module.name = "inception-v3-2048"
    return module


@torch.no_grad()
def extract_features(feature: torch.nn.Module, images: list[Image.Image], batch_size: int = 32) -> torch.Tensor:
    chunks = [feature(images_to_uint8(images[i : i + batch_size])) for i in range(0, len(images), batch_size)]
    return torch.cat(chunks).double()


# ---- FID / KID from features --------------------------------------------------------------------------
def fid_from_features(real: torch.Tensor, fake: torch.Tensor) -> float:
    """Frechet distance between Gaussians fitted to two feature sets."""
    real, fake = real.double(), fake.double()
    mu1, mu2 = real.mean(0), fake.mean(0)
    cov1, cov2 = torch.cov(real.T), torch.cov(fake.T)
    # tr(sqrt(C1 C2)) = sum of sqrt of the eigenvalues of C1 C2 (real, >= 0 up to rounding).
    eigenvalues = torch.linalg.eigvals(cov1 @ cov2).real.clamp(min=0)
    value = (mu1 - mu2).square().sum() + torch.trace(cov1) + torch.trace(cov2) - 2 * eigenvalues.sqrt().sum()
    return float(value.clamp(min=0))


def kid_from_features(real: torch.Tensor, fake: torch.Tensor, subset_size: int, subsets: int = 100, seed: int = 0) -> tuple[float, float]:
    """Unbiased MMD^2 with the cubic polynomial kernel, averaged over random subsets (mean, std)."""
    real, fake = real.double(), fake.double()
    n = subset_size
    if n < 2 or len(real) < n or len(fake) < n:
        raise MetricUnavailable(f"KID needs at least 2 images per set and subset size <= set sizes (got {n}, {len(real)}, {len(fake)})")
    dim = real.shape[1]
    generator = torch.Generator().manual_seed(seed)
    values = []
    for _ in range(subsets):
        x = real[torch.randperm(len(real), generator=generator)[:n]]
        y = fake[torch.randperm(len(fake), generator=generator)[:n]]
        kxx = (x @ x.T / dim + 1) ** 3
        kyy = (y @ y.T / dim + 1) ** 3
        kxy = (x @ y.T / dim + 1) ** 3
        mmd = (kxx.sum() - kxx.diagonal().sum()) / (n * (n - 1)) + (kyy.sum() - kyy.diagonal().sum()) / (n * (n - 1))
        values.append(float(mmd - 2 * kxy.mean()))
    tensor = torch.tensor(values)
    return float(tensor.mean()), float(tensor.std()) if len(values) > 1 else 0.0


# ---- appropriateness ----------------------------------------------------------------------------------
def degenerate_reason(array: np.ndarray, min_std: float = 0.02, black_level: float = 0.04) -> str | None:
    """Why an image in [0,1] (H,W,3) is unusable, or None: NaN, near-constant, or (near) black."""
    if not np.isfinite(array).all():
        return "nan"
    if float(array.mean()) < black_level:
        return "black"
    if float(array.std()) < min_std:
        return "constant"
    return None


def appropriate_rate(arrays: list[np.ndarray], nsfw_flags: list[bool] | None = None) -> float:
    flags = nsfw_flags or [False] * len(arrays)
    good = [degenerate_reason(a) is None and not flagged for a, flagged in zip(arrays, flags)]
    return float(np.mean(good)) if good else 0.0


class SafetyChecker:
    """The SD safety checker, loaded only when eval.safety_checker names one."""

    def __init__(self, source: str, device: torch.device):
        from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
        from transformers import CLIPImageProcessor

        try:
            self.model = StableDiffusionSafetyChecker.from_pretrained(source).to(device).eval()
            self.processor = CLIPImageProcessor.from_pretrained(source)
        except Exception as error:
            raise MetricUnavailable(f"safety checker {source!r} could not be loaded offline ({type(error).__name__})") from None
        self.device = device

    @torch.no_grad()
    def flags(self, arrays: list[np.ndarray]) -> list[bool]:
        safe = [np.nan_to_num(a) for a in arrays]
        inputs = self.processor([Image.fromarray((a * 255).astype(np.uint8)) for a in safe], return_tensors="pt")
        _, flagged = self.model(images=np.stack(safe), clip_input=inputs.pixel_values.to(self.device))
        return [bool(f) for f in flagged]


def feature_cache_path(folder: Path, key: str) -> Path:
    return folder / f"{key}.safetensors"
