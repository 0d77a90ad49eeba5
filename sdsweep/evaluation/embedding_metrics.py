"""The measures that compare embeddings of image sets: CLIP-I and DINO (subject fidelity, per image) and CMMD
(a distribution distance, one value for the set with a bootstrap interval).

Measures like those in measures.py, using the models and reference features the evaluator loaded once;
kept apart so each module stays one screenful of purpose.
"""

from __future__ import annotations

from sdsweep.evaluation import dino, metrics
from sdsweep.evaluation.cmmd import cmmd_interval
from sdsweep.evaluation.measures import Inputs, Measure, Measurement


def _instances(measure: Measure) -> list:
    if not measure.ev.instance_images:
        raise metrics.MetricUnavailable("no instance (training) images were given to the Evaluator")
    return measure.ev.instance_images


class ClipI(Measure):
    """Mean CLIP image-image cosine similarity of each image to the instance (training) images."""

    name = "clip_i"

    def measure(self, inputs: Inputs) -> Measurement:
        instances, ev = _instances(self), self.ev
        assert inputs.images is not None
        scores = metrics.clip_i_per_image(ev.clip_model, ev.clip_processor, inputs.images.images, instances)
        return Measurement(units={"clip_i": scores})


class Dino(Measure):
    """Mean DINO ViT cosine similarity of each image to the instance images (DreamBooth's subject fidelity)."""

    name = "dino"

    def measure(self, inputs: Inputs) -> Measurement:
        instances, ev = _instances(self), self.ev
        assert inputs.images is not None
        scores = dino.dino_per_image(ev.dino_model, ev.dino_processor, inputs.images.images, instances)
        return Measurement(units={"dino": scores})


class Cmmd(Measure):
    """CMMD against the FD/KD reference set, on CLIP embeddings (FD/KD's own when they use CLIP)."""

    name = "cmmd"

    def measure(self, inputs: Inputs) -> Measurement:
        generated, ev = inputs.images, self.ev
        assert generated is not None
        if ev.feature_kind == "clip" and ev.feature is not None:
            reference, fake = ev.reference_features(), ev.generated_features(generated)
        else:
            reference = ev.cmmd_reference()
            fake = metrics.clip_image_embeddings(ev.clip_model, ev.clip_processor, generated.images)
        strata = [spec.prompt_index for spec in generated.specs]
        interval = cmmd_interval(reference.numpy(), fake.numpy(), strata, seed=ev.cfg.eval.seed)
        return Measurement(values={"eval/cmmd": interval})
