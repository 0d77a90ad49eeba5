"""Judge a pipeline the same way every time: fixed prompts and seeds, then metrics. Logs nothing.

A metric that cannot be computed is recorded in ``missing`` with its reason; ``evaluate`` never
raises because of one metric, so a sweep never dies in evaluation.
"""

from __future__ import annotations

import hashlib
import importlib.util
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw

from sdsweep import io, metrics
from sdsweep.config import Config, ConfigError


@dataclass
class EvalResult:
    metrics: dict[str, float] = field(default_factory=dict)
    missing: dict[str, str] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    images: list[Image.Image] = field(default_factory=list)
    prompts: list[str] = field(default_factory=list)
    seeds: list[int] = field(default_factory=list)
    grid: Image.Image | None = None
    seconds: float = 0.0


def to_pil(array: np.ndarray) -> Image.Image:
    return Image.fromarray((np.nan_to_num(array, nan=0.0).clip(0, 1) * 255).round().astype(np.uint8))


@torch.no_grad()
def generate(pipeline, cfg: Config, prompts: list[str] | None = None) -> tuple[list[np.ndarray], list[str], list[int]]:
    """Images in [0,1] as float arrays (NaN stays visible), in prompt-major order, batched."""
    prompts = list(prompts or cfg.eval.prompts)
    if not prompts:
        raise ConfigError("eval.prompts is empty: give at least one validation prompt.")
    resolution = cfg.eval.resolution or cfg.model.resolution
    jobs = [(p, cfg.eval.seed + i) for p in prompts for i in range(cfg.eval.num_images_per_prompt)]
    device = pipeline.device
    arrays: list[np.ndarray] = []
    for start in range(0, len(jobs), cfg.eval.batch_size):
        chunk = jobs[start : start + cfg.eval.batch_size]
        # One generator per image: an image depends on its own seed, not on how it was batched.
        generators = [torch.Generator(device="cpu").manual_seed(seed) for _, seed in chunk]
        out = pipeline(
            [p for p, _ in chunk],
            num_inference_steps=cfg.eval.num_inference_steps,
            guidance_scale=cfg.eval.guidance_scale,
            height=resolution,
            width=resolution,
            generator=generators,
            output_type="np",
        ).images
        arrays.extend(np.asarray(a, dtype=np.float32) for a in out)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return arrays, [p for p, _ in jobs], [s for _, s in jobs]


def labelled_grid(images: list[Image.Image], prompts: list[str], seeds: list[int], cell: int = 128) -> Image.Image:
    """Rows = prompts, columns = seeds, with the prompt and seed written on each row/column."""
    row_prompts = list(dict.fromkeys(prompts))
    col_seeds = list(dict.fromkeys(seeds))
    label_w, label_h = 180, 16
    grid = Image.new("RGB", (label_w + cell * len(col_seeds), label_h + cell * len(row_prompts)), "white")
    draw = ImageDraw.Draw(grid)
    for c, seed in enumerate(col_seeds):
        draw.text((label_w + c * cell + 4, 2), f"seed {seed}", fill="black")
    for r, prompt in enumerate(row_prompts):
        text = prompt if len(prompt) <= 28 else prompt[:27] + "…"
        draw.text((4, label_h + r * cell + cell // 2 - 6), text, fill="black")
    for image, prompt, seed in zip(images, prompts, seeds):
        r, c = row_prompts.index(prompt), col_seeds.index(seed)
        grid.paste(image.resize((cell, cell), Image.Resampling.NEAREST), (label_w + c * cell, label_h + r * cell))
    return grid


class Evaluator:
    """Loads CLIP and the reference features once, then evaluates any number of pipelines."""

    def __init__(
        self,
        cfg: Config,
        study_paths: io.StudyPaths,
        device: torch.device,
        reference_images: list[Image.Image],
        instance_images: list[Image.Image] | None = None,
    ):
        if not cfg.eval.prompts:
            raise ConfigError("eval.prompts is empty: give at least one validation prompt.")
        self.cfg, self.paths, self.device = cfg, study_paths, device
        self.instance_images = instance_images or []
        self.warnings: list[str] = []
        self.unavailable: dict[str, str] = {}
        self.clip = None
        wanted = set(cfg.eval.metrics)
        if wanted & {"clip_score", "clip_i", "fid", "kid"}:
            # An unloadable CLIP is a configuration error: it is raised here, before any training.
            self.clip = metrics.load_clip(cfg.eval.clip_model, cfg.paths.cache, device)
        self.safety = None
        if cfg.eval.safety_checker and "appropriate_rate" in wanted:
            try:
                self.safety = metrics.SafetyChecker(cfg.eval.safety_checker, device)
            except metrics.MetricUnavailable as error:
                self.warnings.append(f"{error}; appropriate_rate uses the degenerate-image check only")
        self.feature = None
        self.reference_features = None
        if wanted & {"fid", "kid"}:
            self._prepare_reference(self._reference_images(reference_images))

    def _reference_images(self, given: list[Image.Image]) -> list[Image.Image]:
        folder = self.cfg.eval.reference_dir
        if not folder:
            return given
        files = sorted(p for p in Path(folder).expanduser().iterdir() if p.suffix.lower() in {".png", ".jpg", ".jpeg", ".webp"})
        images = []
        for path in files:
            with Image.open(path) as image:
                images.append(image.convert("RGB"))
        return images

    def _feature_module(self):
        choice = self.cfg.eval.fid_features
        if choice == "auto":
            choice = "inception" if importlib.util.find_spec("torch_fidelity") else "clip"
            self.warnings.append(f"FID/KID features: {choice} (eval.fid_features=auto)")
        if choice == "inception":
            return metrics.inception_features()
        return metrics.CLIPImageFeatures(*self.clip)

    def _prepare_reference(self, images: list[Image.Image]) -> None:
        from safetensors.torch import load_file, save_file

        try:
            self.feature = self._feature_module()
        except metrics.MetricUnavailable as error:
            self.unavailable["fid"] = self.unavailable["kid"] = str(error)
            return
        if len(images) < 2:
            self.unavailable["fid"] = self.unavailable["kid"] = f"the reference set has {len(images)} image(s); FID/KID need at least 2"
            return
        digest = hashlib.sha256(self.feature.name.encode())
        for image in images:
            digest.update(image.tobytes())
        path = self.paths.cache / "reference" / f"{digest.hexdigest()[:24]}.safetensors"
        if path.exists():
            self.reference_features = load_file(str(path))["features"]
            return
        self.reference_features = metrics.extract_features(self.feature, images)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        save_file({"features": self.reference_features.contiguous()}, str(tmp))
        tmp.replace(path)

    # ---- evaluation ---------------------------------------------------------------------------------
    def val_loss_only(self, method, heldout_batch: dict[str, Any]) -> float:
        """Mean loss over fixed noise and timesteps (seeded per repeat): comparable across trials."""
        losses = []
        with torch.no_grad():
            for k in range(self.cfg.eval.val_loss_timesteps):
                generator = torch.Generator().manual_seed(self.cfg.eval.seed + k)
                loss, _ = method.compute_loss(heldout_batch, generator=generator)
                losses.append(float(loss))
        return float(np.mean(losses))

    def evaluate(self, pipeline, method=None, heldout_batch=None, out_dir: Path | None = None, label: str = "") -> EvalResult:
        started = time.perf_counter()
        result = EvalResult(warnings=list(self.warnings))
        wanted = list(self.cfg.eval.metrics)
        arrays, result.prompts, result.seeds = generate(pipeline, self.cfg)
        result.images = [to_pil(a) for a in arrays]

        def attempt(name: str, compute) -> None:
            if name not in wanted:
                return
            if name in self.unavailable:
                result.missing[name] = self.unavailable[name]
                return
            try:
                compute()
            except Exception as error:  # recorded, never raised: one metric must not fail a trial
                result.missing[name] = f"{type(error).__name__}: {error}"

        usable = [i for i, a in enumerate(arrays) if metrics.degenerate_reason(a) != "nan"]

        def clip_scores() -> None:
            model, processor = self.clip
            if not usable:
                raise metrics.MetricUnavailable("every generated image is NaN")
            images = [result.images[i] for i in usable]
            prompts = [result.prompts[i] for i in usable]
            result.metrics["eval/clip_score"] = metrics.clip_score(model, processor, images, prompts)
            for index, prompt in enumerate(self.cfg.eval.prompts):
                picks = [i for i in usable if result.prompts[i] == prompt]
                if picks:
                    result.metrics[f"eval/clip_score/p{index}"] = metrics.clip_score(
                        model, processor, [result.images[i] for i in picks], [prompt] * len(picks)
                    )

        def fid() -> None:
            fake = metrics.extract_features(self.feature, result.images)
            result.metrics["eval/fid"] = metrics.fid_from_features(self.reference_features, fake)
            n = min(len(fake), len(self.reference_features))
            result.metrics["eval/fid_reliable"] = float(n >= self.cfg.eval.min_reliable_fid_images)
            if n < self.cfg.eval.min_reliable_fid_images:
                result.warnings.append(f"FID on {n} images is unreliable (fewer than {self.cfg.eval.min_reliable_fid_images})")
            self._fake_features = fake

        def kid() -> None:
            fake = getattr(self, "_fake_features", None)
            fake = fake if fake is not None else metrics.extract_features(self.feature, result.images)
            subset = min(self.cfg.eval.kid_subset_size, len(fake), len(self.reference_features))
            if subset < self.cfg.eval.kid_subset_size:
                result.warnings.append(f"KID subset size shrunk from {self.cfg.eval.kid_subset_size} to {subset} (small sets)")
            result.metrics["eval/kid"], result.metrics["eval/kid_std"] = metrics.kid_from_features(
                self.reference_features, fake, subset
            )

        def clip_i() -> None:
            if not self.instance_images:
                raise metrics.MetricUnavailable("no instance images given")
            result.metrics["eval/clip_i"] = metrics.clip_i(*self.clip, result.images, self.instance_images)

        def appropriate() -> None:
            flags = self.safety.flags(arrays) if self.safety is not None else None
            result.metrics["eval/appropriate_rate"] = metrics.appropriate_rate(arrays, flags)

        def val_loss() -> None:
            if method is None or heldout_batch is None:
                raise metrics.MetricUnavailable("no method/held-out batch given")
            result.metrics["eval/val_loss"] = self.val_loss_only(method, heldout_batch)

        self._fake_features = None
        for name, compute in [
            ("clip_score", clip_scores),
            ("fid", fid),
            ("kid", kid),
            ("clip_i", clip_i),
            ("appropriate_rate", appropriate),
            ("val_loss", val_loss),
        ]:
            attempt(name, compute)
        result.grid = labelled_grid(result.images, result.prompts, result.seeds)
        if out_dir is not None:
            self.save_images(result, Path(out_dir))
        result.seconds = time.perf_counter() - started
        return result

    def save_images(self, result: EvalResult, out_dir: Path) -> None:
        samples = out_dir / io.TRIAL_SAMPLES
        samples.mkdir(parents=True, exist_ok=True)
        prompt_index = {p: i for i, p in enumerate(self.cfg.eval.prompts)}
        for image, prompt, seed in zip(result.images, result.prompts, result.seeds):
            io.atomic_save_image(samples / io.sample_name(prompt_index[prompt], seed), image)
        io.atomic_save_image(out_dir / io.TRIAL_GRID, result.grid)
