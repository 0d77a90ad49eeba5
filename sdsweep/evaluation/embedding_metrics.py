"""The metrics that compare embeddings of image sets: CLIP-I and DINO (subject fidelity, per image) and CMMD
(a distribution distance, one value for the set with a bootstrap interval).

A mixin of ``Evaluator`` (``evaluate.py``): the same one-method-per-metric signature, using the models and
reference features the evaluator loaded once. Kept apart so each module stays one screenful of purpose.
"""

from __future__ import annotations

from sdsweep.evaluation import dino, metrics
from sdsweep.evaluation.cmmd import cmmd_interval
from sdsweep.evaluation.generation import Generated


class EmbeddingMetrics:
    """``_clip_i``, ``_dino``, ``_cmmd``: each fills unit columns or returns {key: value or Interval}."""

    def _clip_i(
        self, generated: Generated, warnings: list[str], per_image: dict, units: dict
    ) -> dict[str, float]:
        if not self.instance_images:
            raise metrics.MetricUnavailable("no instance (training) images were given to the Evaluator")
        units["clip_i"] = metrics.clip_i_per_image(
            self.clip_model, self.clip_processor, generated.images, self.instance_images
        )
        return {}

    def _dino(self, generated: Generated, warnings: list[str], per_image: dict, units: dict) -> dict:
        if not self.instance_images:
            raise metrics.MetricUnavailable("no instance (training) images were given to the Evaluator")
        units["dino"] = dino.dino_per_image(
            self.dino_model, self.dino_processor, generated.images, self.instance_images
        )
        return {}

    def _cmmd(self, generated: Generated, warnings: list[str], per_image: dict, units: dict) -> dict:
        """CMMD against the FD/KD reference set, on CLIP embeddings (FD/KD's own when they use CLIP)."""
        if self.feature_kind == "clip" and self.feature is not None:
            reference, fake = self.reference_features(), self._generated_features(generated)
        else:
            if self._cmmd_reference is None:
                self._cmmd_reference = metrics.clip_image_embeddings(
                    self.clip_model, self.clip_processor, self.reference_images
                )
            reference = self._cmmd_reference
            fake = metrics.clip_image_embeddings(self.clip_model, self.clip_processor, generated.images)
        strata = [spec.prompt_index for spec in generated.specs]
        return {"eval/cmmd": cmmd_interval(reference.numpy(), fake.numpy(), strata, seed=self.cfg.eval.seed)}
