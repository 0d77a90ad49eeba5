"""Section 3, evaluation throughput: sdsweep's evaluation sampler against the one SD checkpoints ship with.

Images/s of the tiny pipeline at 32 px, one call of ``batch`` prompts with guidance: DPM-Solver++ at the
evaluation step count (25, ``eval.num_inference_steps``) against 50-step PNDM. The ideal speedup is 2x
(half the UNet calls); the 1.5x floor is this bench's own sanity check, not a number from the issue.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Any

RESOLUTION = 32


@dataclass(frozen=True)
class EvalPlan:
    batch: int  # prompts per pipeline call
    repeats: int  # interleaved timed calls per sampler
    steps: tuple[int, int]  # (DPM-Solver++ steps, PNDM steps)


FULL_PLAN = EvalPlan(batch=8, repeats=5, steps=(25, 50))
QUICK_PLAN = EvalPlan(batch=2, repeats=1, steps=(5, 10))


def images_per_second(pipe, prompts: list[str], steps: int, resolution: int, guidance: float) -> float:
    import torch

    generators = [torch.Generator().manual_seed(1234 + i) for i in range(len(prompts))]
    started = time.perf_counter()
    pipe(
        prompts,
        num_inference_steps=steps,
        height=resolution,
        width=resolution,
        guidance_scale=guidance,
        generator=generators,
        output_type="pil",
    )
    return len(prompts) / (time.perf_counter() - started)


def run(quick: bool) -> dict[str, Any]:
    from sdsweep.config.schema import EvalConfig
    from sdsweep.models import tiny
    from sdsweep.models.loading import load_pipeline

    plan = QUICK_PLAN if quick else FULL_PLAN
    source = str(tiny.ensure_tiny_model("sd15"))
    eval_cfg = EvalConfig()
    fast_steps, slow_steps = plan.steps
    pipes = {
        "dpmsolver++": (load_pipeline(source, scheduler="dpmsolver++"), fast_steps),
        "pndm": (load_pipeline(source, scheduler="pndm"), slow_steps),
    }
    prompts = [eval_cfg.prompts[0]] * plan.batch
    samples: dict[str, list[float]] = {name: [] for name in pipes}
    for pipe, steps in pipes.values():  # warm-up, untimed
        images_per_second(pipe, prompts, steps, RESOLUTION, eval_cfg.guidance_scale)
    for _ in range(plan.repeats):  # interleaved so drift hits both samplers alike
        for name, (pipe, steps) in pipes.items():
            samples[name].append(images_per_second(pipe, prompts, steps, RESOLUTION, eval_cfg.guidance_scale))
    rows = {
        name: {"num_inference_steps": pipes[name][1], "images_per_second": statistics.median(values)}
        for name, values in samples.items()
    }
    return {
        "model": "tiny:sd15",
        "resolution": RESOLUTION,
        "batch_size": plan.batch,
        "guidance_scale": eval_cfg.guidance_scale,
        "repeats": plan.repeats,
        "samplers": rows,
        "speedup": rows["dpmsolver++"]["images_per_second"] / rows["pndm"]["images_per_second"],
    }
