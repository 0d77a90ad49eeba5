"""The held-out-captions protocol (``eval.protocol=heldout_captions``): one image per held-out photo's
caption, scored against that photo, and the per-caption table the report shows beside the photos.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from PIL import Image

from sdsweep import io
from sdsweep.errors import ConfigError
from sdsweep.evaluation.generation import SampleSpec
from sdsweep.evaluation.protocol_files import HELDOUT_TABLE, HELDOUT_TRUTH, truth_name


def heldout_plan(captions: Sequence[str] | None, photo_count: int, seed: int) -> list[SampleSpec]:
    """One image per caption; caption i always starts from the noise of ``seed + i``.

    Raises ConfigError unless there is one non-empty caption per held-out photo (same order).
    """
    texts = [str(c) for c in captions or []]
    if not texts or len(texts) != photo_count or any(not c.strip() for c in texts):
        raise ConfigError(
            f"eval.protocol=heldout_captions needs one non-empty caption per held-out photo (got "
            f"{len(texts)} captions for {photo_count} photos); use a captioned dataset "
            "(data=imagefolder with a caption column) and data.num_heldout >= 2."
        )
    return [SampleSpec(i, caption, seed + i) for i, caption in enumerate(texts)]


def write_heldout_table(
    out_dir: Path,
    truth_dir: Path,
    specs: Sequence[SampleSpec],
    photos: Sequence[Image.Image],
    per_image: dict[str, list[float]],
) -> None:
    """The test-set table's rows for this model; the ground-truth photos are written once per study."""
    rows = []
    for index, spec in enumerate(specs):
        truth = truth_dir / truth_name(spec.prompt_index)
        if not truth.exists():
            io.atomic_save_image(truth, photos[spec.prompt_index])
        row = {
            "caption": spec.prompt,
            "seed": spec.seed,
            "sample": f"{io.TRIAL_SAMPLES}/{io.sample_name(spec.prompt_index, spec.seed)}",
            "truth": f"{HELDOUT_TRUTH}/{truth_name(spec.prompt_index)}",
        }
        row.update({key: values[index] for key, values in per_image.items()})
        rows.append(row)
    io.atomic_write_json(out_dir / HELDOUT_TABLE, {"rows": rows})
