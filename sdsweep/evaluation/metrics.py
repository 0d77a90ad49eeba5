"""Pure image metrics: CLIP score, FID/KID, CLIP-I and appropriateness (degeneracy + safety checker).

Nothing here knows about configs, pipelines or study folders (that is ``evaluate.py``). FID and KID are
computed by torchmetrics from *feature matrices*: the feature extractor runs once per image set and the
reference features can be cached per study, while torchmetrics still does all the statistics. The feature
extractor is injectable: the standard Inception where torch-fidelity exists, CLIP image embeddings
offline, or any ``nn.Module`` with ``num_features`` in tests.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

from sdsweep.config.features import torch_fidelity_available, torchvision_available


class MetricUnavailable(RuntimeError):
    """A metric cannot be computed here; the evaluator records it as missing with this message."""


class CLIPUnavailableError(RuntimeError):
    """The configured CLIP model cannot be loaded (offline, typo). Raised before any generation."""


# Every score is computed by one process. torchmetrics would otherwise gather its state over a live
# torch.distributed group: with train.num_processes > 1, rank 0 evaluates while the others wait.
LOCAL = {"sync_on_compute": False}


# ---- image conversion ------------------------------------------------------------------------------------
def images_to_uint8(images: Sequence[Image.Image], device: torch.device | str = "cpu") -> torch.Tensor:
    """PIL images of one size -> uint8 tensor [N,3,H,W] (what torchmetrics' image metrics expect)."""
    sizes = {image.size for image in images}
    if len(sizes) > 1:
        raise ValueError(
            f"Images of different sizes {sorted(sizes)} cannot be batched; resize them first "
            "(e.g. with sdsweep.evaluation.metrics.square_resize)."
        )
    arrays = [np.asarray(image.convert("RGB"), dtype=np.uint8) for image in images]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous().to(device)


def square_resize(image: Image.Image, resolution: int) -> Image.Image:
    """Shorter side to ``resolution`` then a centre crop, so reference photos match generated images."""
    image = image.convert("RGB")
    scale = resolution / min(image.size)
    width, height = max(resolution, round(image.width * scale)), max(resolution, round(image.height * scale))
    image = image.resize((width, height), Image.Resampling.BICUBIC)
    left, top = (width - resolution) // 2, (height - resolution) // 2
    return image.crop((left, top, left + resolution, top + resolution))


def float_to_pil(array: np.ndarray) -> Image.Image:
    """An (H,W,3) float image in [0,1] -> PIL; NaN becomes black so a broken image is still saveable."""
    clean = np.nan_to_num(array, nan=0.0, posinf=1.0, neginf=0.0).clip(0.0, 1.0)
    return Image.fromarray((clean * 255).round().astype(np.uint8))


# ---- CLIP model ------------------------------------------------------------------------------------------
def _tensor_features_clip_class() -> type:
    from transformers import CLIPModel

    class TensorFeaturesCLIPModel(CLIPModel):
        """transformers 5 returns output objects from ``get_*_features``; torchmetrics 1.9 needs tensors."""

        def get_image_features(self, *args, **kwargs):
            out = super().get_image_features(*args, **kwargs)
            return out if isinstance(out, torch.Tensor) else out.pooler_output

        def get_text_features(self, *args, **kwargs):
            out = super().get_text_features(*args, **kwargs)
            return out if isinstance(out, torch.Tensor) else out.pooler_output

    return TensorFeaturesCLIPModel


def load_clip(name: str, cache: str | None = None, device: torch.device | str = "cpu"):
    """(model, processor) for ``"tiny"`` (built offline), a shapes build (``shapes:sd15``), a folder or a hub ID.

    Raises ``CLIPUnavailableError`` with the fix when the weights are neither local nor downloadable.
    """
    from transformers import CLIPProcessor

    if name == "tiny":
        from sdsweep.models import tiny

        source = str(tiny.ensure_tiny_clip(cache))
    elif name.startswith("shapes:"):  # shapes:sd15[@seed<N>]: that build's CLIP, saved in its clip/ folder
        from sdsweep.models import shapes

        source = shapes.resolve_clip(name, cache)
    else:
        source = os.path.expanduser(name)
    try:
        model = _tensor_features_clip_class().from_pretrained(source)
        processor = CLIPProcessor.from_pretrained(source)
    except Exception as error:  # offline, missing, gated or misspelt: the fix is the same
        raise CLIPUnavailableError(
            f"CLIP model {name!r} could not be loaded offline ({type(error).__name__}: {str(error)[:200]}); "
            "download it once or set eval.clip_model to a local folder / 'tiny'."
        ) from None
    model.requires_grad_(False)
    return model.eval().to(device), processor


def _model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


# ---- CLIP score / CLIP-I ---------------------------------------------------------------------------------
def clip_score(model, processor, images: Sequence[Image.Image], prompts: Sequence[str]) -> float:
    """CLIP score (100 x cosine similarity, floored at 0) averaged over the pairs, as torchmetrics'
    ``CLIPScore`` defines it; the mean of ``clip_scores``."""
    return float(np.mean(clip_scores(model, processor, images, prompts)))


@torch.no_grad()
def clip_scores(model, processor, images: Sequence[Image.Image], prompts: Sequence[str]) -> list[float]:
    """One CLIP score per (image, prompt) pair: the per-unit values every interval and paired comparison use.

    The same formula as torchmetrics' ``CLIPScore`` (unit-length embeddings, 100 x cosine, floored at 0),
    computed per pair. Prompts are tokenized with truncation to the text tower's length, so a long prompt is
    cut as the text encoder cuts it (and transformers has no padding-without-truncation to warn about).
    """
    if len(images) != len(prompts) or not images:
        raise ValueError(
            f"CLIP score needs one prompt per image (got {len(images)} images, {len(prompts)} prompts)."
        )
    device = _model_device(model)
    image_embeddings = clip_image_embeddings(model, processor, images)
    tokenizer = getattr(processor, "tokenizer", processor)
    max_length = model.config.text_config.max_position_embeddings
    text = tokenizer(list(prompts), padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    text_features = model.get_text_features(
        input_ids=text["input_ids"].to(device), attention_mask=text["attention_mask"].to(device)
    )
    text_embeddings = torch.nn.functional.normalize(text_features.float(), dim=-1).cpu()
    scores = 100.0 * (image_embeddings * text_embeddings).sum(dim=-1)
    return [float(s) for s in scores.clamp(min=0.0)]


@torch.no_grad()
def clip_image_embeddings(model, processor, images: Sequence[Image.Image]) -> torch.Tensor:
    """Unit-length CLIP image embeddings [N, D] on the CPU."""
    inputs = processor(images=[image.convert("RGB") for image in images], return_tensors="pt")
    features = model.get_image_features(pixel_values=inputs["pixel_values"].to(_model_device(model)))
    return torch.nn.functional.normalize(features.float(), dim=-1).cpu()


def clip_i(model, processor, generated: Sequence[Image.Image], instances: Sequence[Image.Image]) -> float:
    """Subject fidelity (DreamBooth's CLIP-I): mean cosine similarity over all generated x instance pairs."""
    return float(np.mean(clip_i_per_image(model, processor, generated, instances)))


def clip_i_per_image(
    model, processor, generated: Sequence[Image.Image], instances: Sequence[Image.Image]
) -> list[float]:
    """Each generated image's mean cosine similarity to the instance images (their mean is ``clip_i``)."""
    if not generated or not instances:
        raise MetricUnavailable("CLIP-I needs generated images and at least one instance image.")
    similarity = (
        clip_image_embeddings(model, processor, generated)
        @ clip_image_embeddings(model, processor, instances).T
    )
    return [float(v) for v in similarity.mean(dim=1)]


# ---- feature extractors for FID / KID --------------------------------------------------------------------
class CLIPImageFeatures(torch.nn.Module):
    """uint8 images [N,3,H,W] -> CLIP image embeddings: a FID/KID feature space that needs no download."""

    def __init__(self, model, processor, name: str):
        super().__init__()
        self.model, self.processor = model, processor
        self.num_features = int(model.config.projection_dim)
        self.feature_id = f"clip:{name}"  # part of the reference-statistics cache key

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        pil = [Image.fromarray(image.permute(1, 2, 0).cpu().numpy()) for image in images]
        inputs = self.processor(images=pil, return_tensors="pt")
        return self.model.get_image_features(
            pixel_values=inputs["pixel_values"].to(_model_device(self.model))
        ).float()


def inception_features() -> torch.nn.Module:
    """The standard 2048-d FID Inception, exactly as torchmetrics builds it for ``feature=2048``."""
    if not torch_fidelity_available():
        raise MetricUnavailable(
            "eval.fid_features=inception needs torch-fidelity (and its Inception weights), which is not installed "
            "here; set eval.fid_features=clip or auto."
        )
    from torchmetrics.image.fid import FrechetInceptionDistance

    module = FrechetInceptionDistance(feature=2048).inception
    module.num_features = 2048
    module.feature_id = "inception-v3-2048"
    return module


@torch.no_grad()
def extract_features(
    feature: torch.nn.Module, images: Sequence[Image.Image], batch_size: int = 16
) -> torch.Tensor:
    """Feature matrix [N, D] (float64, CPU) of PIL images of one size, in batches."""
    device = _model_device(feature) if any(True for _ in feature.parameters()) else torch.device("cpu")
    chunks = [
        feature(images_to_uint8(images[start : start + batch_size], device)).double().cpu()
        for start in range(0, len(images), batch_size)
    ]
    return torch.cat(chunks)


class _PrecomputedFeatures(torch.nn.Module):
    """Identity 'extractor': lets torchmetrics' FID/KID consume feature matrices computed (or cached) earlier."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = num_features

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features


def frechet_distance(real: torch.Tensor, fake: torch.Tensor) -> float:
    """torchmetrics ``FrechetInceptionDistance`` on two feature matrices (needs >= 2 rows each)."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    if len(real) < 2 or len(fake) < 2:
        raise MetricUnavailable(
            f"FID needs at least 2 images per set (got {len(real)} reference, {len(fake)} generated)."
        )
    # torchmetrics' FID uses torch.linalg.eigvals for the matrix square root: no scipy needed.
    metric = FrechetInceptionDistance(feature=_PrecomputedFeatures(real.shape[1]), **LOCAL)
    metric.update(real.double(), real=True)
    metric.update(fake.double(), real=False)
    # FID is >= 0 by definition; the eigenvalue square root can dip a hair below for identical sets.
    return max(0.0, float(metric.compute()))


def kernel_inception_distance(
    real: torch.Tensor, fake: torch.Tensor, subset_size: int, subsets: int = 100, seed: int = 0
) -> tuple[float, float]:
    """torchmetrics ``KernelInceptionDistance`` (mean, std) with seeded subset sampling."""
    import warnings

    from torchmetrics.image.kid import KernelInceptionDistance

    if subset_size < 2 or len(real) < subset_size or len(fake) < subset_size:
        raise MetricUnavailable(
            f"KID needs a subset size of at least 2 and no larger than either set "
            f"(subset {subset_size}, {len(real)} reference, {len(fake)} generated)."
        )
    with warnings.catch_warnings():  # "KID keeps all features in memory": intended, our sets are small
        warnings.simplefilter("ignore", UserWarning)
        metric = KernelInceptionDistance(
            feature=_PrecomputedFeatures(real.shape[1]), subset_size=subset_size, subsets=subsets, **LOCAL
        )
    metric.update(real.double(), real=True)
    metric.update(fake.double(), real=False)
    # torchmetrics draws subsets with the global RNG; fork it so the score is reproducible and the
    # caller's random state (e.g. a training loop's) is left untouched.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        mean, std = metric.compute()
    return float(mean), float(std)


# ---- appropriateness -------------------------------------------------------------------------------------
MIN_PIXEL_STD = 0.02  # below this an image is a flat colour (a collapsed model), not a picture
BLACK_LEVEL = 0.04  # a pixel darker than ~10/255 on every channel counts as black
MAX_BLACK_SHARE = 0.9  # the SD safety checker's "black image" replacement, or a dead decoder


def degenerate_reason(array: np.ndarray) -> str | None:
    """Why an (H,W,3) float image in [0,1] is unusable ("nan", "black", "constant"), or None if it is fine."""
    if not np.isfinite(array).all():
        return "nan"
    if float((array.max(axis=-1) < BLACK_LEVEL).mean()) >= MAX_BLACK_SHARE:
        return "black"
    if float(array.std()) < MIN_PIXEL_STD:
        return "constant"
    return None


def pil_to_float(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0


def appropriate_rate(arrays: Sequence[np.ndarray], unsafe: Sequence[bool] | None = None) -> float:
    """Share of images that are neither degenerate nor flagged unsafe."""
    return float(np.mean(appropriate_flags(arrays, unsafe)))


def appropriate_flags(arrays: Sequence[np.ndarray], unsafe: Sequence[bool] | None = None) -> list[bool]:
    """Per image: neither degenerate nor flagged unsafe (the per-unit values of ``appropriate_rate``)."""
    if not arrays:
        raise MetricUnavailable("appropriate_rate needs at least one image.")
    flags = list(unsafe) if unsafe is not None else [False] * len(arrays)
    return [degenerate_reason(a) is None and not flag for a, flag in zip(arrays, flags, strict=True)]


class SafetyChecker:
    """The Stable Diffusion safety checker, loaded only when ``eval.safety_checker`` names one."""

    def __init__(self, source: str, device: torch.device | str = "cpu"):
        from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
        from transformers import CLIPImageProcessor

        try:
            self.model = (
                StableDiffusionSafetyChecker.from_pretrained(os.path.expanduser(source)).to(device).eval()
            )
            self.processor = CLIPImageProcessor.from_pretrained(os.path.expanduser(source))
        except Exception as error:
            raise MetricUnavailable(
                f"safety checker {source!r} could not be loaded offline ({type(error).__name__}); only the "
                "degeneracy check applies. Download it once or set eval.safety_checker to a local folder."
            ) from None
        self.device = torch.device(device)

    @torch.no_grad()
    def unsafe(self, arrays: Sequence[np.ndarray]) -> list[bool]:
        clean = [np.nan_to_num(a).clip(0, 1) for a in arrays]
        inputs = self.processor([float_to_pil(a) for a in clean], return_tensors="pt")
        _, flagged = self.model(images=np.stack(clean), clip_input=inputs["pixel_values"].to(self.device))
        return [bool(flag) for flag in flagged]


# ---- LPIPS -----------------------------------------------------------------------------------------------
# LPIPS (Zhang et al. 2018): unit-normalise each layer's features per position over the channels, take the
# squared difference, average over positions, combine the layers. The real metric uses AlexNet/VGG features
# and learned per-channel weights (torchmetrics, which needs torchvision and downloaded weights). Offline the
# same structure runs on another feature network with equal weights; its key names the backbone
# (``eval/lpips_clip``), so the number is never mistaken for the published LPIPS.


def pil_to_signed(images: Sequence[Image.Image], device: torch.device | str = "cpu") -> torch.Tensor:
    """PIL images of one size -> float [N,3,H,W] in [-1, 1] (the LPIPS convention)."""
    return images_to_uint8(images, device).float() / 127.5 - 1.0


class CLIPVisionLPIPSFeatures(torch.nn.Module):
    """The CLIP vision tower's per-layer patch tokens as LPIPS features: [N, channels, positions] per layer."""

    def __init__(self, model, processor, layers: Sequence[int] | None = None):
        super().__init__()
        self.vision = model.vision_model
        config = model.config.vision_config
        self.image_size = int(config.image_size)
        processor_config = getattr(processor, "image_processor", processor)
        self.register_buffer("mean", torch.tensor(processor_config.image_mean).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(processor_config.image_std).view(1, 3, 1, 1))
        # Every transformer layer by default (equal weights): shallow layers see texture, deep ones content.
        self.layers = list(layers) if layers is not None else list(range(1, config.num_hidden_layers + 1))

    @torch.no_grad()
    def forward(self, signed: torch.Tensor) -> list[torch.Tensor]:
        pixels = (signed.float() + 1.0) / 2.0
        pixels = torch.nn.functional.interpolate(
            pixels, size=(self.image_size, self.image_size), mode="bicubic", align_corners=False
        ).clamp(0, 1)
        pixels = (pixels - self.mean.to(pixels.device)) / self.std.to(pixels.device)
        hidden = self.vision(pixel_values=pixels, output_hidden_states=True).hidden_states
        return [hidden[i][:, 1:, :].transpose(1, 2) for i in self.layers]  # patch tokens, no CLS


@torch.no_grad()
def lpips_structured(feature: torch.nn.Module, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-pair LPIPS-structured distance [N] between images in [-1, 1] with an injected feature network."""
    if a.shape != b.shape:
        raise ValueError(f"LPIPS needs pairs of one shape, got {tuple(a.shape)} and {tuple(b.shape)}.")
    distances = []
    for fa, fb in zip(feature(a), feature(b), strict=True):
        fa = torch.nn.functional.normalize(fa.float(), dim=1, eps=1e-8)
        fb = torch.nn.functional.normalize(fb.float(), dim=1, eps=1e-8)
        distances.append(((fa - fb) ** 2).sum(dim=1).flatten(1).mean(dim=1))
    return torch.stack(distances).mean(dim=0).cpu()


class TorchmetricsLPIPS:
    """The published LPIPS (torchmetrics; needs torchvision and its downloaded backbone weights)."""

    def __init__(self, net: str, device: torch.device | str = "cpu"):
        if not torchvision_available():
            raise MetricUnavailable(
                f"eval.lpips_backbone={net} needs torchvision and its {net} weights, which are not installed "
                "here; set eval.lpips_backbone=clip for the offline CLIP-feature variant (eval/lpips_clip)."
            )
        from torchmetrics.image.lpip import LearnedPerceptualImagePatchSimilarity

        try:
            self.metric = LearnedPerceptualImagePatchSimilarity(net_type=net, normalize=False, **LOCAL).to(
                device
            )
        except Exception as error:
            raise MetricUnavailable(
                f"LPIPS {net} weights could not be loaded offline ({type(error).__name__}); "
                "download them once or set eval.lpips_backbone=clip."
            ) from None
        self.device = torch.device(device)

    @torch.no_grad()
    def __call__(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        values = []
        for x, y in zip(
            a, b
        ):  # torchmetrics reduces over the batch; one pair at a time gives per-image values
            self.metric.reset()
            self.metric.update(x[None].to(self.device), y[None].to(self.device))
            values.append(float(self.metric.compute()))
        return torch.tensor(values)
