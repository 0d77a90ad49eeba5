"""What an evaluation gives (``EvalResult``) and leaves in a trial folder: the sample images and the labelled grid."""

from __future__ import annotations

import textwrap
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
from PIL import Image, ImageDraw, ImageFont

from sdsweep import io
from sdsweep.evaluation.generation import SampleSpec
from sdsweep.uncertainty import Interval


@dataclass
class EvalResult:
    metrics: dict[str, float]
    missing: dict[str, str]  # metric key -> why it could not be computed
    warnings: list[str]
    images: list[Image.Image]
    prompts: list[str]  # one per image
    seeds: list[int]  # one per image
    grid: Image.Image
    seconds: float
    # heldout_captions protocol: per-image values keyed like the metric (e.g. "eval/lpips_clip": [..]).
    per_image: dict[str, list[float]] = field(default_factory=dict)
    # One row per image (sdsweep.evaluation.units): the per-image metrics are computed from it.
    units: pd.DataFrame | None = None
    # Every numeric metric's 95% interval, or an Interval with method "none" saying why it has none.
    intervals: dict[str, Interval] = field(default_factory=dict)


MIN_GRID_CELL = 128  # tiny 32 px samples are upscaled so the grid labels stay readable


def make_grid(
    images: Sequence[Image.Image], specs: Sequence[SampleSpec], prompts: Sequence[str]
) -> Image.Image:
    """Rows = prompts, columns = seeds, with the prompt text on the left and the seed above each column."""
    font = ImageFont.load_default(size=14)  # a scalable font: the bitmap default's spaces vanish when scaled
    seeds = sorted({spec.seed for spec in specs})
    side = max([MIN_GRID_CELL] + [max(image.size) for image in images])
    label_width, header = 220, 22
    grid = Image.new("RGB", (label_width + side * len(seeds), header + side * max(1, len(prompts))), "white")
    draw = ImageDraw.Draw(grid)
    for column, seed in enumerate(seeds):
        draw.text((label_width + column * side + 4, 4), f"seed {seed}", fill="black", font=font)
    for row, prompt in enumerate(prompts):
        lines = textwrap.wrap(f"p{row:02d}: {prompt}", width=26)[:8]
        draw.multiline_text((4, header + row * side + 4), "\n".join(lines), fill="black", font=font)
    for image, spec in zip(images, specs):
        # NEAREST keeps small samples crisp instead of blurring them into the label text's scale.
        cell = image.convert("RGB").resize((side, side), Image.Resampling.NEAREST)
        grid.paste(cell, (label_width + seeds.index(spec.seed) * side, header + spec.prompt_index * side))
    return grid


def save_outputs(
    out_dir: Path, images: Sequence[Image.Image], specs: Sequence[SampleSpec], grid: Image.Image
) -> None:
    samples = out_dir / io.TRIAL_SAMPLES
    for image, spec in zip(images, specs):
        io.atomic_save_image(samples / io.sample_name(spec.prompt_index, spec.seed), image)
    io.atomic_save_image(out_dir / io.TRIAL_GRID, grid)
