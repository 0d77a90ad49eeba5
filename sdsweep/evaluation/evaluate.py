"""Judge a pipeline the same way every time: fixed prompts, fixed seeds, one sampler, one set of metrics.

``Evaluator`` is built once per run (it loads CLIP and the reference features once) and ``evaluate`` is
called at every milestone: it samples the images (generation), scores them metric by metric and
assembles the ``EvalResult``. A metric that cannot be computed is recorded in ``missing`` with the reason;
``evaluate`` never raises, so one broken metric never loses a trial. Impossible *configuration* (no
prompts, a missing reference folder, a CLIP model that is not available offline) raises at construction,
before any image is generated.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from sdsweep import io
from sdsweep.config.constraints import distance_keys, resolved_lpips_backbone
from sdsweep.config.resolve import resolved_guidance_rescale
from sdsweep.config.schema import Config
from sdsweep.config.validate import check_eval_prompts
from sdsweep.evaluation import dino, metrics
from sdsweep.evaluation.generation import Generated, SampleSpec, generate, sample_plan
from sdsweep.evaluation.heldout import heldout_plan, write_heldout_table
from sdsweep.evaluation.judge import judge_units
from sdsweep.evaluation.measure_table import build_measures
from sdsweep.evaluation.measures import (
    CONCEPT_IMAGES,
    EVERY_IMAGE,
    NO_IMAGES,
    Inputs,
    Measurement,
    reason_of,
)
from sdsweep.evaluation.outputs import EvalResult, make_grid, save_outputs
from sdsweep.evaluation.protocol_files import HELDOUT_TRUTH
from sdsweep.evaluation.reference import (
    cached_reference_features,
    choose_feature_kind,
    feature_identity,
    load_reference_dir,
    reference_key,
)
from sdsweep.evaluation.units import build_units, no_interval_reasons, summarize, write_units
from sdsweep.evaluation.validation import validation_loss
from sdsweep.metric_names import lpips_key
from sdsweep.uncertainty import Interval


# ---- the evaluator ---------------------------------------------------------------------------------------
class Evaluator:
    """Loads CLIP, the FID/KID feature extractor and the reference features once; then judges pipelines."""

    def __init__(
        self,
        cfg: Config,
        study_paths: io.StudyPaths,
        device: torch.device | str,
        reference_images: Sequence[Image.Image],
        instance_images: Sequence[Image.Image] | None = None,
        heldout_captions: Sequence[str] | None = None,
    ):
        """``heldout_captions`` (one per reference image, same order) drive eval.protocol=heldout_captions."""
        self.cfg, self.device = cfg, torch.device(device)
        ev = cfg.eval
        self._plan_samples(heldout_captions, len(reference_images))
        self.wanted = list(dict.fromkeys(ev.metrics))
        self.resolution = ev.resolution or cfg.model.resolution
        self.fid_key, self.kid_key = distance_keys(ev.fid_features)
        self.truth_dir = study_paths.root / HELDOUT_TRUTH
        self.reference_cache = study_paths.cache / "reference"
        self.static_warnings: list[str] = []
        self._feature_error: str | None = None
        self._reference: torch.Tensor | None = None
        self.reference_from_cache: bool | None = None  # set once the reference features are known

        references = load_reference_dir(ev.reference_dir) if ev.reference_dir else list(reference_images)
        self.reference_images = [metrics.square_resize(image, self.resolution) for image in references]
        self.instance_images = [metrics.square_resize(i, self.resolution) for i in instance_images or []]

        self._load_judges()
        self.measures = build_measures(self, self.wanted)

    # -- construction helpers
    def _plan_samples(self, heldout_captions: Sequence[str] | None, reference_count: int) -> None:
        """The prompts and the (prompt, seed) samples: the concept's (the fixed prompts, or one held-out
        caption per reference image), then the prior prompts'."""
        ev = self.cfg.eval
        self.heldout = ev.protocol == "heldout_captions"
        if self.heldout:
            concept_plan = heldout_plan(heldout_captions, reference_count, ev.seed)
            self.prompts = [spec.prompt for spec in concept_plan]
        else:
            self.prompts = list(ev.prompts)
            concept_plan = sample_plan(self.prompts, ev.num_images_per_prompt, ev.seed)
        check_eval_prompts(self.prompts)
        # Prior prompts come after the concept's, with the same seeds and their own rows (prompt indices).
        self.prior_prompts = [str(p) for p in ev.prior_prompts or []]
        prior_plan = [
            SampleSpec(len(self.prompts) + spec.prompt_index, spec.prompt, spec.seed)
            for spec in sample_plan(self.prior_prompts, ev.num_images_per_prompt, ev.seed)
        ]
        self.concept_count = len(concept_plan)
        self.plan = concept_plan + prior_plan

    def _load_judges(self) -> None:
        """CLIP, the FID/KID feature extractor, DINO, the safety checker and LPIPS, each only when a wanted
        metric needs it."""
        ev = self.cfg.eval
        wants_features = bool({"fid", "kid"} & set(self.wanted))
        self.feature_kind = (
            choose_feature_kind(ev.fid_features, self.static_warnings) if wants_features else None
        )
        self.lpips_backbone = resolved_lpips_backbone(ev.lpips_backbone) if "lpips" in self.wanted else None
        needs_clip = (
            bool({"clip_score", "clip_i", "cmmd"} & set(self.wanted))
            or self.feature_kind == "clip"
            or self.lpips_backbone == "clip"
        )
        self.clip_model, self.clip_processor = (None, None)
        if needs_clip:  # CLIPUnavailableError propagates: a config problem, reported before any generation
            self.clip_model, self.clip_processor = metrics.load_clip(
                ev.clip_model, self.cfg.paths.cache, self.device
            )
        self.feature = self._build_feature_extractor() if wants_features else None
        self._cmmd_reference: torch.Tensor | None = None
        self.dino_model, self.dino_processor = (None, None)
        if "dino" in self.wanted:  # DINOUnavailableError propagates, like CLIP's
            self.dino_model, self.dino_processor = dino.load_dino(
                ev.dino_model, self.cfg.paths.cache, self.device
            )
        self.safety_checker = self._load_safety_checker() if ev.safety_checker else None
        self._lpips_error: str | None = None
        self.lpips = self._build_lpips() if self.lpips_backbone else None

    def _build_feature_extractor(self) -> torch.nn.Module | None:
        try:
            if self.feature_kind == "inception":
                return metrics.inception_features().to(self.device)
            source = getattr(self.clip_model, "name_or_path", "") or self.cfg.eval.clip_model
            source = feature_identity(source, self.cfg.paths.cache)
            return metrics.CLIPImageFeatures(self.clip_model, self.clip_processor, source)
        except Exception as error:  # recorded per evaluation as missing FID/KID, never fatal
            self._feature_error = f"no FID/KID feature extractor: {reason_of(error)}"
            return None

    def _build_lpips(self):
        """A callable (a, b in [-1, 1]) -> per-pair distances, or None with the reason kept for ``missing``."""
        try:
            if self.lpips_backbone == "clip":
                feature = metrics.CLIPVisionLPIPSFeatures(self.clip_model, self.clip_processor).to(
                    self.device
                )
                return lambda a, b: metrics.lpips_structured(feature, a, b)
            return metrics.TorchmetricsLPIPS(self.lpips_backbone, self.device)
        except Exception as error:
            self._lpips_error = f"no LPIPS network: {reason_of(error)}"
            return None

    def _load_safety_checker(self) -> metrics.SafetyChecker | None:
        try:
            return metrics.SafetyChecker(self.cfg.eval.safety_checker, self.device)
        except Exception as error:
            self.static_warnings.append(f"{error} eval/appropriate_rate uses the degeneracy check only.")
            return None

    def reference_features(self) -> torch.Tensor:
        """Reference features, computed once per study and cached under ``cache/reference``."""
        if self._reference is None:
            if self.feature is None:
                raise metrics.MetricUnavailable(self._feature_error or "no feature extractor")
            if len(self.reference_images) < 2:
                raise metrics.MetricUnavailable(
                    f"FID/KID need at least 2 reference images, got {len(self.reference_images)}; set "
                    "eval.reference_dir or data.num_heldout >= 2."
                )
            key = reference_key(self.reference_images, self.feature.feature_id, self.resolution)
            self._reference, self.reference_from_cache = cached_reference_features(
                self.reference_cache,
                key,
                lambda: metrics.extract_features(
                    self.feature, self.reference_images, self.cfg.eval.batch_size
                ),
            )
        return self._reference

    # -- public API
    def val_loss_only(self, method, heldout_batch: dict[str, Any]) -> float:
        """The fixed-seed validation loss alone: a cheap signal for pruning between full evaluations."""
        return validation_loss(method, heldout_batch, self.cfg.eval.seed, self.cfg.eval.val_loss_timesteps)

    def evaluate(
        self,
        pipeline,
        method=None,
        heldout_batch: dict[str, Any] | None = None,
        out_dir: Path | None = None,
        label: str = "",
        round_number: int = 0,
    ) -> EvalResult:
        """Generate, measure, save. ``round_number`` tags the unit rows (0: the trial's own evaluation;
        k: the k-th confirmation round, sampled with fresh seeds)."""
        started = time.perf_counter()
        warnings = list(self.static_warnings)
        generated, generation_error = self._generate(pipeline, warnings, f"{label}: " if label else "")
        measured = self._measure(generated, generation_error, method, heldout_batch)
        warnings += measured.warnings
        units, intervals = None, {}
        values = measured.values
        if generation_error is None:
            units = build_units(
                generated.specs,
                self.concept_count,
                len(self.prompts),
                measured.units,
                self.cfg.eval.protocol,
                round_number,
                self.lpips_key,
            )
            unit_means, intervals = summarize(units, self.lpips_key, seed=self.cfg.eval.seed)
            values.update(unit_means)  # the per-image metrics are the table's means and shares
        intervals.update(measured.intervals)
        intervals.update(no_interval_reasons(values, intervals))
        grid = make_grid(generated.images, generated.specs, self.prompts + self.prior_prompts)
        if out_dir is not None:
            warnings += self._save(Path(out_dir), generated, grid, units, measured.per_image, label)
        return EvalResult(
            metrics=values,
            missing=measured.missing,
            warnings=list(dict.fromkeys(warnings)),
            images=generated.images,
            prompts=[spec.prompt for spec in generated.specs],
            seeds=[spec.seed for spec in generated.specs],
            grid=grid,
            seconds=time.perf_counter() - started,
            per_image=measured.per_image,
            units=units,
            intervals=intervals,
        )

    @property
    def lpips_key(self) -> str | None:
        return lpips_key(self.lpips_backbone) if self.lpips_backbone else None

    def _generate(self, pipeline, warnings: list[str], prefix: str) -> tuple[Generated, str | None]:
        """The plan's images, or none and why (every image measure is then missing; the loss may work)."""
        ev = self.cfg.eval
        try:
            generated = generate(
                pipeline,
                self.plan,
                scheduler=ev.scheduler,
                num_inference_steps=ev.num_inference_steps,
                guidance_scale=ev.guidance_scale,
                resolution=self.resolution,
                batch_size=ev.batch_size,
                zero_terminal_snr=self.cfg.train.zero_terminal_snr,
                guidance_rescale=resolved_guidance_rescale(self.cfg),
                dtype=ev.dtype,
                group_boundary=self.concept_count,
            )
        except Exception as error:
            warnings.append(f"{prefix}generation failed: {reason_of(error)}")
            return Generated(specs=list(self.plan)), f"generation failed: {reason_of(error)}"
        nan_count = sum(not np.isfinite(a).all() for a in generated.arrays)
        if nan_count:
            warnings.append(f"{prefix}{nan_count} of {len(generated.arrays)} generated images contain NaN.")
        return generated, None

    def _measure(
        self, generated: Generated, generation_error: str | None, method, heldout_batch
    ) -> _Measured:
        """Every measure on the images it reads, then the judge's ground truth (known-answer worlds)."""
        out = _Measured()
        # FID/KID, CLIP-I and LPIPS compare the concept's images with the concept's photos; CLIP score scores
        # both groups, each apart; every image, prior ones included, is usable or not (appropriate rate).
        images = {
            EVERY_IMAGE: generated,
            CONCEPT_IMAGES: generated.part(0, self.concept_count),
            NO_IMAGES: None,
        }
        for measure in self.measures:
            if measure.reads != NO_IMAGES and generation_error is not None:
                out.missing[measure.key] = generation_error
                continue
            try:
                measurement = measure.measure(Inputs(images[measure.reads], method, heldout_batch))
            except Exception as error:
                out.missing[measure.key] = reason_of(error)
                continue
            out.add(measurement)
        if self.cfg.eval.judge and generation_error is None:
            try:
                prompts = [s.prompt for s in generated.specs]
                verdicts = judge_units(self.cfg.eval.judge, generated.images, prompts)
                out.units["truth_group"] = [group for group, _ in verdicts]
                out.units["truth"] = [right for _, right in verdicts]
            except Exception as error:
                out.missing["truth"] = reason_of(error)
        return out

    def _save(self, out_dir: Path, generated: Generated, grid, units, per_image, label: str) -> list[str]:
        """Samples, grid, unit table (and the held-out table); a full disk warns, never loses the metrics."""
        try:
            save_outputs(out_dir, generated.images, generated.specs, grid)
            if units is not None:
                write_units(out_dir, units)
            if self.heldout:
                concept = generated.part(0, self.concept_count)
                write_heldout_table(out_dir, self.truth_dir, concept.specs, self.reference_images, per_image)
        except OSError as error:
            prefix = f"{label}: " if label else ""
            return [f"{prefix}could not save samples/grid to {out_dir}: {error}"]
        return []

    # -- shared by the measures (measures.py, embedding_metrics.py)
    def generated_features(self, generated: Generated) -> torch.Tensor:
        """FID/KID features of the generated images, computed on first use and shared by FID, KID and CMMD."""
        if generated.features is None:
            if self.feature is None:
                raise metrics.MetricUnavailable(self._feature_error or "no feature extractor")
            generated.features = metrics.extract_features(
                self.feature, generated.images, self.cfg.eval.batch_size
            )
        return generated.features

    def cmmd_reference(self) -> torch.Tensor:
        """CLIP embeddings of the reference images, for CMMD when FD/KD use other features."""
        if self._cmmd_reference is None:
            self._cmmd_reference = metrics.clip_image_embeddings(
                self.clip_model, self.clip_processor, self.reference_images
            )
        return self._cmmd_reference

    def unavailable_reason(self, name: str) -> str | None:
        """Why measure ``name`` cannot work in this run (its network failed to load), or None."""
        if name in ("fid", "kid") and self.feature is None:
            return self._feature_error or "no feature extractor"
        if name == "lpips" and self.lpips is None:
            return self._lpips_error or "no LPIPS network"
        return None


@dataclass
class _Measured:
    """Everything the measures of one evaluation gave, merged."""

    values: dict[str, float] = field(default_factory=dict)
    intervals: dict[str, Interval] = field(default_factory=dict)  # set statistics' own (bootstrap) intervals
    units: dict[str, list] = field(default_factory=dict)
    per_image: dict[str, list[float]] = field(default_factory=dict)
    missing: dict[str, str] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    def add(self, measurement: Measurement) -> None:
        for key, value in measurement.values.items():
            if isinstance(value, Interval):
                self.intervals[key], value = value, value.value
            self.values[key] = value
        self.units.update(measurement.units)
        self.per_image.update(measurement.per_image)
        self.warnings += measurement.warnings
