"""A second, larger ground-truth sample for one target of a finished shapes study (``make validate --deep N``).

The study's own truth is counted on the 16-96 images its evaluation and confirmation gave a trial, so a pick
near the drift guard's line (prior accuracy 0.70 against a kept-at line of 0.74, Wilson interval
[0.59, 0.79]) can be neither called a miss nor cleared. This module draws ``per_prompt`` fresh images of
every eval prompt and prior prompt with the trial's weights (or the untuned model), on seeds no evaluation
of the study used, and lets the world's judge count them: the same question on 4-8x the images.

Only the judge reads these images (no CLIP, no verdict): they measure the truth the table compares against,
never the study's decision.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Far from any eval.seed a study uses (1234, 4321, and confirmation's rounds above them): fresh images.
DEEP_SEED = 9_000_000


@dataclass
class DeepTruth:
    """One target's truth on the deep sample: accuracy with its Wilson 95% interval, per group."""

    target: str  # "t0005" or "baseline"
    concept: list[float | int | None]  # [mean, lo, hi, n]
    prior: list[float | int | None]

    def to_json(self) -> dict[str, Any]:
        return {"target": self.target, "concept": self.concept, "prior": self.prior}


def deep_truth(
    study_dir: Path,
    which: str,
    per_prompt: int,
    prompts: list[str] | None = None,
    seed: int = DEEP_SEED,
    batch_size: int = 16,
) -> DeepTruth:
    """Judge ``per_prompt`` fresh images of each prompt (default: the study's eval and prior prompts) drawn by
    ``which`` (a trial number or ``baseline``), with the study's own sampler settings."""
    import torch

    from sdsweep.config.resolve import resolved_resolution
    from sdsweep.evaluation.judge import judge_each
    from sdsweep.results.generate import load_pipeline_for, resolve_target
    from sdsweep.uncertainty import rate_interval

    target = resolve_target(study_dir, which)
    pipeline, cfg = load_pipeline_for(target, torch.device("cpu"), None)
    prompts = prompts or [*cfg.eval.prompts, *cfg.eval.prior_prompts]
    resolution = cfg.eval.resolution or resolved_resolution(cfg)
    hits: dict[str, list[float]] = {"concept": [], "prior": []}
    for index, prompt in enumerate(prompts):
        seeds = [seed + 100_000 * index + i for i in range(per_prompt)]
        for start in range(0, per_prompt, batch_size):
            chunk = seeds[start : start + batch_size]
            images = pipeline(
                [prompt] * len(chunk),
                num_inference_steps=cfg.eval.num_inference_steps,
                guidance_scale=cfg.eval.guidance_scale,
                height=resolution,
                width=resolution,
                generator=[torch.Generator().manual_seed(s) for s in chunk],
            ).images
            for group, right in judge_each(images, [prompt] * len(chunk)):
                if group is not None:
                    hits[group].append(float(right))

    def summary(values: list[float]) -> list[float | int | None]:
        if not values:
            return [None, None, None, 0]
        interval = rate_interval(values)
        return [interval.value, interval.lo, interval.hi, interval.n]

    return DeepTruth(target.label, summary(hits["concept"]), summary(hits["prior"]))
