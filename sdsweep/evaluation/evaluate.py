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
import traceback
from collections.abc import Sequence
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
from sdsweep.evaluation.embedding_metrics import EmbeddingMetrics
from sdsweep.evaluation.generation import Generated, SampleSpec, generate, sample_plan
from sdsweep.evaluation.heldout import heldout_plan, write_heldout_table
from sdsweep.evaluation.judge import judge_units
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
from sdsweep.evaluation.validation import validation_loss, validation_loss_by_band
from sdsweep.metric_names import lpips_key
from sdsweep.uncertainty import Interval


# ---- the evaluator ---------------------------------------------------------------------------------------
def _reason(error: BaseException) -> str:
    """A one-line reason for ``missing``; unexpected errors also say where they happened."""
    if isinstance(error, metrics.MetricUnavailable):
        return str(error)
    frame = traceback.extract_tb(error.__traceback__)[-1] if error.__traceback__ else None
    where = f" (at {Path(frame.filename).name}:{frame.lineno})" if frame else ""
    return f"{type(error).__name__}: {error}{where}"


class Evaluator(EmbeddingMetrics):
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
        self.heldout = ev.protocol == "heldout_captions"
        if self.heldout:
            concept_plan = heldout_plan(heldout_captions, len(reference_images), ev.seed)
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
                ev.clip_model, cfg.paths.cache, self.device
            )
        self.feature = self._build_feature_extractor() if wants_features else None
        self._cmmd_reference: torch.Tensor | None = None
        self.dino_model, self.dino_processor = (None, None)
        if "dino" in self.wanted:  # DINOUnavailableError propagates, like CLIP's
            self.dino_model, self.dino_processor = dino.load_dino(ev.dino_model, cfg.paths.cache, self.device)
        self.safety_checker = self._load_safety_checker() if ev.safety_checker else None
        self._lpips_error: str | None = None
        self.lpips = self._build_lpips() if self.lpips_backbone else None

    # -- construction helpers
    def _build_feature_extractor(self) -> torch.nn.Module | None:
        try:
            if self.feature_kind == "inception":
                return metrics.inception_features().to(self.device)
            source = getattr(self.clip_model, "name_or_path", "") or self.cfg.eval.clip_model
            source = feature_identity(source, self.cfg.paths.cache)
            return metrics.CLIPImageFeatures(self.clip_model, self.clip_processor, source)
        except Exception as error:  # recorded per evaluation as missing FID/KID, never fatal
            self._feature_error = f"no FID/KID feature extractor: {_reason(error)}"
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
            self._lpips_error = f"no LPIPS network: {_reason(error)}"
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
        ev = self.cfg.eval
        values: dict[str, float] = {}
        missing: dict[str, str] = {}
        warnings = list(self.static_warnings)
        prefix = f"{label}: " if label else ""
        generated = Generated(specs=list(self.plan))
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
            nan_count = sum(not np.isfinite(a).all() for a in generated.arrays)
            if nan_count:
                warnings.append(
                    f"{prefix}{nan_count} of {len(generated.arrays)} generated images contain NaN."
                )
        except Exception as error:  # no images: every image metric is missing, val_loss may still work
            warnings.append(f"{prefix}generation failed: {_reason(error)}")
            generation_error = f"generation failed: {_reason(error)}"
        else:
            generation_error = None

        # FID/KID, CLIP-I and LPIPS compare the concept's images with the concept's photos; CLIP score scores
        # both groups, each apart; every image, prior ones included, is usable or not (appropriate rate).
        concept = generated.part(0, self.concept_count)
        inputs = {"clip_score": generated, "appropriate_rate": generated}
        image_metrics = {
            "clip_score": self._clip_score,
            "fid": self._fid,
            "kid": self._kid,
            "lpips": self._lpips,
            "clip_i": self._clip_i,
            "dino": self._dino,
            "cmmd": self._cmmd,
            "appropriate_rate": self._appropriate_rate,
        }
        per_image: dict[str, list[float]] = {}
        unit_values: dict[str, list] = {}  # per-image scores, the unit table's columns
        set_intervals: dict[str, Interval] = {}  # set statistics that bring their own (bootstrap) interval
        for name in self.wanted:
            key = {"fid": self.fid_key, "kid": self.kid_key}.get(name, f"eval/{name}")
            if name == "lpips":
                key = lpips_key(self.lpips_backbone)
            try:
                if name == "val_loss":
                    values.update(self._val_loss(method, heldout_batch))
                elif generation_error is not None:
                    missing[key] = generation_error
                else:
                    scores = image_metrics[name](inputs.get(name, concept), warnings, per_image, unit_values)
                    for metric_key, score in scores.items():
                        if isinstance(score, Interval):
                            set_intervals[metric_key], score = score, score.value
                        values[metric_key] = score
            except Exception as error:
                missing[key] = _reason(error)

        if ev.judge and generation_error is None:  # ground truth beside the metrics (known-answer worlds)
            try:
                verdicts = judge_units(ev.judge, generated.images, [s.prompt for s in generated.specs])
                unit_values["truth_group"] = [group for group, _ in verdicts]
                unit_values["truth"] = [right for _, right in verdicts]
            except Exception as error:
                missing["truth"] = _reason(error)
        units, intervals = None, {}
        if generation_error is None:
            lpips_name = lpips_key(self.lpips_backbone) if self.lpips_backbone else None
            units = build_units(
                generated.specs,
                self.concept_count,
                len(self.prompts),
                unit_values,
                ev.protocol,
                round_number,
                lpips_name,
            )
            unit_means, intervals = summarize(units, lpips_name, seed=ev.seed)
            values.update(unit_means)  # the per-image metrics are the table's means and shares
        intervals.update(set_intervals)
        intervals.update(no_interval_reasons(values, intervals))
        grid = make_grid(generated.images, generated.specs, self.prompts + self.prior_prompts)
        if out_dir is not None:
            try:
                save_outputs(Path(out_dir), generated.images, generated.specs, grid)
                if units is not None:
                    write_units(Path(out_dir), units)
                if self.heldout:
                    write_heldout_table(
                        Path(out_dir), self.truth_dir, concept.specs, self.reference_images, per_image
                    )
            except OSError as error:  # a full disk must not lose the metrics themselves
                warnings.append(f"{prefix}could not save samples/grid to {out_dir}: {error}")
        return EvalResult(
            metrics=values,
            missing=missing,
            warnings=list(dict.fromkeys(warnings)),
            images=generated.images,
            prompts=[spec.prompt for spec in generated.specs],
            seeds=[spec.seed for spec in generated.specs],
            grid=grid,
            seconds=time.perf_counter() - started,
            per_image=per_image,
            units=units,
            intervals=intervals,
        )

    # -- one method per metric; each returns {key: value} and may append warnings
    def _clip_score(
        self, generated: Generated, warnings: list[str], per_image: dict, units: dict
    ) -> dict[str, float]:
        """One CLIP score per image, with its own prompt: ``eval/clip_score`` is the mean over the concept's
        images, ``eval/prior_clip_score`` over the prior's, each with a per-prompt breakdown (``.../p{i}``,
        i counted within its own group); ``summarize`` computes them from the unit table."""
        scores: list[float] = []
        # Group by group, as the images were sampled: the concept's scores never depend on the prior prompts.
        for part in (
            generated.part(0, self.concept_count),
            generated.part(self.concept_count, len(generated.specs)),
        ):
            if part.specs:
                prompts = [s.prompt for s in part.specs]
                scores += metrics.clip_scores(self.clip_model, self.clip_processor, part.images, prompts)
        units["clip"] = scores
        return {}

    def _generated_features(self, generated: Generated) -> torch.Tensor:
        if generated.features is None:
            if self.feature is None:
                raise metrics.MetricUnavailable(self._feature_error or "no feature extractor")
            generated.features = metrics.extract_features(
                self.feature, generated.images, self.cfg.eval.batch_size
            )
        return generated.features

    def _fid(
        self, generated: Generated, warnings: list[str], per_image: dict, units: dict
    ) -> dict[str, float]:
        reference = self.reference_features()
        value = metrics.frechet_distance(reference, self._generated_features(generated))
        n = len(generated.images)
        reliable = n >= self.cfg.eval.min_reliable_fid_images
        if not reliable:
            warnings.append(
                f"{'FID' if self.fid_key == 'eval/fid' else 'FD_CLIP'} on {n} images is unreliable (eval.min_reliable_fid_images={self.cfg.eval.min_reliable_fid_images}); "
                "use it to rank trials of this study only."
            )
        return {self.fid_key: value, f"{self.fid_key}_reliable": 1.0 if reliable else 0.0}

    def _kid(
        self, generated: Generated, warnings: list[str], per_image: dict, units: dict
    ) -> dict[str, float]:
        reference = self.reference_features()
        fake = self._generated_features(generated)
        wanted = self.cfg.eval.kid_subset_size
        subset = min(wanted, len(fake), len(reference))
        if subset < wanted:
            warnings.append(
                f"KID subset size shrunk from eval.kid_subset_size={wanted} to {subset} "
                f"({len(fake)} generated, {len(reference)} reference images)."
            )
        mean, _ = metrics.kernel_inception_distance(reference, fake, subset, seed=self.cfg.eval.seed)
        return {self.kid_key: mean}

    def _lpips(
        self, generated: Generated, warnings: list[str], per_image: dict, units: dict
    ) -> dict[str, float]:
        """Paired LPIPS: image i against held-out photo i, both in [-1, 1]; per image and the mean."""
        if self.lpips is None:
            raise metrics.MetricUnavailable(self._lpips_error or "no LPIPS network")
        key = lpips_key(self.lpips_backbone)
        values: list[float] = []
        batch = self.cfg.eval.batch_size
        for start in range(0, len(generated.images), batch):
            chunk = generated.specs[start : start + batch]
            fake = metrics.pil_to_signed(generated.images[start : start + batch], self.device)
            real = metrics.pil_to_signed([self.reference_images[s.prompt_index] for s in chunk], self.device)
            values.extend(float(v) for v in self.lpips(fake, real))
        per_image[key] = values
        units["lpips"] = values
        return {}

    def _appropriate_rate(
        self, generated: Generated, warnings: list[str], per_image: dict, units: dict
    ) -> dict[str, float]:
        unsafe = None
        if self.safety_checker is not None:
            try:
                unsafe = self.safety_checker.unsafe(generated.arrays)
            except Exception as error:
                warnings.append(
                    f"safety checker failed ({_reason(error)}); only the degeneracy check applied."
                )
        units["appropriate"] = [float(ok) for ok in metrics.appropriate_flags(generated.arrays, unsafe)]
        return {}

    def _val_loss(self, method, heldout_batch: dict[str, Any] | None) -> dict[str, float]:
        if method is None:
            raise metrics.MetricUnavailable("no method given (a plain pipeline has no training loss)")
        if heldout_batch is None:
            raise metrics.MetricUnavailable("no held-out batch given (data.num_heldout=0?)")
        ev = self.cfg.eval
        by_band = validation_loss_by_band(
            method, heldout_batch, ev.seed, ev.val_loss_timesteps, ev.val_loss_bands
        )
        return {"eval/val_loss": self.val_loss_only(method, heldout_batch), **by_band}
