"""Sampling the evaluation images: which (prompt, seed) pairs, and running the pipeline over them.

Every trial sees the same starting noise: image i of a prompt uses ``eval.seed + i``, with one generator
per image so the images do not depend on the batch size.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image

from sdsweep.evaluation import metrics
from sdsweep.models.loading import make_inference_scheduler, sampling_precision
from sdsweep.progress import Progress


@dataclass(frozen=True)
class SampleSpec:
    prompt_index: int
    prompt: str
    seed: int


@dataclass
class Generated:
    specs: list[SampleSpec]
    arrays: list[np.ndarray] = field(default_factory=list)  # float (H,W,3) in [0,1]; NaN kept visible
    images: list[Image.Image] = field(default_factory=list)
    features: torch.Tensor | None = None  # FID/KID features, computed on first use and shared by both

    def part(self, start: int, stop: int) -> Generated:
        """Plan entries start..stop (the concept's or the prior's images), with their images if generated."""
        return Generated(self.specs[start:stop], self.arrays[start:stop], self.images[start:stop])

    def part_of_prompt(self, prompt_index: int) -> Generated:
        keep = [i for i, spec in enumerate(self.specs) if spec.prompt_index == prompt_index]
        return Generated(
            [self.specs[i] for i in keep],
            [self.arrays[i] for i in keep if i < len(self.arrays)],
            [self.images[i] for i in keep if i < len(self.images)],
        )


def sample_plan(prompts: Sequence[str], num_images_per_prompt: int, seed: int) -> list[SampleSpec]:
    """Image i of every prompt uses ``seed + i``, so every trial sees the same starting noise."""
    return [
        SampleSpec(p, prompt, seed + i)
        for p, prompt in enumerate(prompts)
        for i in range(num_images_per_prompt)
    ]


def generate(
    pipeline,
    plan: Sequence[SampleSpec],
    *,
    scheduler: str,
    num_inference_steps: int,
    guidance_scale: float,
    resolution: int,
    batch_size: int,
    zero_terminal_snr: bool = False,
    guidance_rescale: float = 0.0,
    dtype: str = "auto",
    group_boundary: int | None = None,
) -> Generated:
    """Run the pipeline over the plan in batches; one generator per image makes results batch-independent.

    ``dtype`` (``eval.dtype``): auto samples under half-precision autocast on CUDA and in fp32 on CPU.
    ``group_boundary``: no batch straddles this plan index (the concept's images end there, the prior's
    begin). A batch's composition moves a BLAS result by a rounding step, so adding prior prompts must not
    change one pixel of the concept's images.
    """
    result = Generated(specs=list(plan))
    starts = list(range(0, group_boundary or 0, batch_size))
    starts += list(range(group_boundary or 0, len(plan), batch_size))
    ends = starts[1:] + [len(plan)]
    if group_boundary:
        ends = [
            min(end, group_boundary) if start < group_boundary else end for start, end in zip(starts, ends)
        ]
    original_scheduler = pipeline.scheduler
    # Swap the sampler in for the evaluation only: the caller's pipeline is left as it was given.
    # zero_terminal_snr: trials and the baseline alike sample with the rescaled, trailing schedule.
    pipeline.scheduler = make_inference_scheduler(scheduler, original_scheduler.config, zero_terminal_snr)
    pipeline.set_progress_bar_config(disable=True)
    bar = Progress("eval", len(plan), "images", leave=False)
    try:
        for start, end in zip(starts, ends):
            chunk = plan[start:end]
            with sampling_precision(dtype, pipeline.device):
                output = pipeline(
                    prompt=[spec.prompt for spec in chunk],
                    generator=[torch.Generator("cpu").manual_seed(spec.seed) for spec in chunk],
                    num_inference_steps=num_inference_steps,
                    guidance_scale=guidance_scale,
                    guidance_rescale=guidance_rescale,
                    height=resolution,
                    width=resolution,
                    output_type="np",  # floats, so a NaN image is detectable before conversion to uint8
                )
            result.arrays.extend(np.asarray(image, dtype=np.float32) for image in output.images)
            bar.advance(len(chunk))
    finally:
        bar.close()
        pipeline.scheduler = original_scheduler
    result.images = [metrics.float_to_pil(array) for array in result.arrays]
    return result
