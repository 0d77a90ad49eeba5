"""What an evaluation measures: one small object per entry of ``eval.metrics``.

Each measure says which images it reads (``reads``: every image, the concept's only, or none for the
training loss) and turns them into a ``Measurement``: metric values (a set statistic may bring its own
``Interval``), per-image columns for the unit table (from which ``summarize`` computes the per-image
metrics and their intervals), the held-out protocol's per-image columns, and warnings. Nothing is passed
in to be mutated, so a measure reads top to bottom and can be tested alone.

``Evaluator`` (evaluate.py) loads the models once and builds the table (measure_table.py); a measure
that cannot work in this run (no LPIPS network, no feature extractor) is still in the table, and says why
at every evaluation, so the record's ``missing`` names the reason rather than the metric vanishing.
The embedding measures (CLIP-I, DINO, CMMD) live in embedding_metrics.py.
"""

from __future__ import annotations

import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sdsweep.evaluation import metrics
from sdsweep.evaluation.generation import Generated
from sdsweep.evaluation.validation import validation_loss, validation_loss_by_band
from sdsweep.metric_names import lpips_key
from sdsweep.uncertainty import Interval

if TYPE_CHECKING:  # the evaluator builds measures; measures only read what it loaded
    from sdsweep.evaluation.evaluate import Evaluator

EVERY_IMAGE, CONCEPT_IMAGES, NO_IMAGES = "every image", "concept images", "no images"


def reason_of(error: BaseException) -> str:
    """A one-line reason for ``missing``; unexpected errors also say where they happened."""
    if isinstance(error, metrics.MetricUnavailable):
        return str(error)
    frame = traceback.extract_tb(error.__traceback__)[-1] if error.__traceback__ else None
    where = f" (at {Path(frame.filename).name}:{frame.lineno})" if frame else ""
    return f"{type(error).__name__}: {error}{where}"


@dataclass
class Measurement:
    values: dict[str, float | Interval] = field(default_factory=dict)
    units: dict[str, list] = field(default_factory=dict)  # unit-table columns, one value per image read
    per_image: dict[str, list[float]] = field(default_factory=dict)  # the held-out table's columns
    warnings: list[str] = field(default_factory=list)


@dataclass
class Inputs:
    images: Generated | None  # the images the measure reads; None for NO_IMAGES
    method: Any = None  # the training method (for the loss), when the caller has one
    heldout_batch: dict[str, Any] | None = None


class Measure:
    """One metric. ``key`` is where a failure is recorded in ``missing``."""

    name: str = ""
    reads: str = CONCEPT_IMAGES

    def __init__(self, evaluator: Evaluator):
        self.ev = evaluator

    @property
    def key(self) -> str:
        return f"eval/{self.name}"

    def measure(self, inputs: Inputs) -> Measurement:
        raise NotImplementedError


class Unavailable(Measure):
    """A measure that cannot work in this run; every evaluation records why under its key."""

    def __init__(self, evaluator: Evaluator, wrapped: Measure, reason: str):
        super().__init__(evaluator)
        self.name, self.reads, self._key, self.reason = wrapped.name, wrapped.reads, wrapped.key, reason

    @property
    def key(self) -> str:
        return self._key

    def measure(self, inputs: Inputs) -> Measurement:
        raise metrics.MetricUnavailable(self.reason)


class ClipScore(Measure):
    """One CLIP score per image with its own prompt: ``eval/clip_score`` is the concept images' mean and
    ``eval/prior_clip_score`` the prior images', each with a per-prompt breakdown, all computed from the
    unit table's ``clip`` column by ``summarize``."""

    name, reads = "clip_score", EVERY_IMAGE

    def measure(self, inputs: Inputs) -> Measurement:
        generated, ev = inputs.images, self.ev
        assert generated is not None
        scores: list[float] = []
        # Group by group, as the images were sampled: the concept's scores never depend on the prior prompts.
        for part in (
            generated.part(0, ev.concept_count),
            generated.part(ev.concept_count, len(generated.specs)),
        ):
            if part.specs:
                prompts = [s.prompt for s in part.specs]
                scores += metrics.clip_scores(ev.clip_model, ev.clip_processor, part.images, prompts)
        return Measurement(units={"clip": scores})


class Fid(Measure):
    name = "fid"

    @property
    def key(self) -> str:
        return self.ev.fid_key

    def measure(self, inputs: Inputs) -> Measurement:
        generated, ev = inputs.images, self.ev
        assert generated is not None
        value = metrics.frechet_distance(ev.reference_features(), ev.generated_features(generated))
        n, least = len(generated.images), ev.cfg.eval.min_reliable_fid_images
        reliable = n >= least
        warnings = []
        if not reliable:
            name = "FID" if self.key == "eval/fid" else "FD_CLIP"
            warnings.append(
                f"{name} on {n} images is unreliable (eval.min_reliable_fid_images={least}); "
                "use it to rank trials of this study only."
            )
        values = {self.key: value, f"{self.key}_reliable": 1.0 if reliable else 0.0}
        return Measurement(values=values, warnings=warnings)


class Kid(Measure):
    name = "kid"

    @property
    def key(self) -> str:
        return self.ev.kid_key

    def measure(self, inputs: Inputs) -> Measurement:
        generated, ev = inputs.images, self.ev
        assert generated is not None
        reference, fake = ev.reference_features(), ev.generated_features(generated)
        wanted = ev.cfg.eval.kid_subset_size
        subset = min(wanted, len(fake), len(reference))
        warnings = []
        if subset < wanted:
            warnings.append(
                f"KID subset size shrunk from eval.kid_subset_size={wanted} to {subset} "
                f"({len(fake)} generated, {len(reference)} reference images)."
            )
        mean, _ = metrics.kernel_inception_distance(reference, fake, subset, seed=ev.cfg.eval.seed)
        return Measurement(values={self.key: mean}, warnings=warnings)


class Lpips(Measure):
    """Paired LPIPS: image i against held-out photo i, both in [-1, 1]."""

    name = "lpips"

    @property
    def key(self) -> str:
        return lpips_key(self.ev.lpips_backbone)

    def measure(self, inputs: Inputs) -> Measurement:
        generated, ev = inputs.images, self.ev
        assert generated is not None and ev.lpips is not None
        values: list[float] = []
        batch = ev.cfg.eval.batch_size
        for start in range(0, len(generated.images), batch):
            chunk = generated.specs[start : start + batch]
            fake = metrics.pil_to_signed(generated.images[start : start + batch], ev.device)
            real = metrics.pil_to_signed([ev.reference_images[s.prompt_index] for s in chunk], ev.device)
            values.extend(float(v) for v in ev.lpips(fake, real))
        return Measurement(units={"lpips": values}, per_image={self.key: values})


class AppropriateRate(Measure):
    """Every image, prior ones included, is usable or not: degenerate (blank, NaN) or flagged unsafe."""

    name, reads = "appropriate_rate", EVERY_IMAGE

    def measure(self, inputs: Inputs) -> Measurement:
        generated, ev = inputs.images, self.ev
        assert generated is not None
        unsafe, warnings = None, []
        if ev.safety_checker is not None:
            try:
                unsafe = ev.safety_checker.unsafe(generated.arrays)
            except Exception as error:
                warnings.append(
                    f"safety checker failed ({reason_of(error)}); only the degeneracy check applied."
                )
        flags = [float(ok) for ok in metrics.appropriate_flags(generated.arrays, unsafe)]
        return Measurement(units={"appropriate": flags}, warnings=warnings)


class ValLoss(Measure):
    """The fixed-seed held-out training loss, overall and per timestep band (no images needed)."""

    name, reads = "val_loss", NO_IMAGES

    def measure(self, inputs: Inputs) -> Measurement:
        if inputs.method is None:
            raise metrics.MetricUnavailable("no method given (a plain pipeline has no training loss)")
        if inputs.heldout_batch is None:
            raise metrics.MetricUnavailable("no held-out batch given (data.num_heldout=0?)")
        ev = self.ev.cfg.eval
        loss = validation_loss(inputs.method, inputs.heldout_batch, ev.seed, ev.val_loss_timesteps)
        by_band = validation_loss_by_band(
            inputs.method, inputs.heldout_batch, ev.seed, ev.val_loss_timesteps, ev.val_loss_bands
        )
        return Measurement(values={"eval/val_loss": loss, **by_band})
