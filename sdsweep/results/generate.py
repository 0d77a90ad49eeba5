"""Generate images with a trial of a finished study (or its untuned baseline).

``python -m sdsweep.generate experiments/<study> [--trial N|best|baseline] --prompt "..."
[--num-images 4 --seed 0 --steps 25 --guidance 7.5 --out file_or_dir]``

The trial is loaded from its saved config (``trials/NNNN/config.yaml``) and weights through
``sdsweep.training.methods.load_trained_pipeline``, i.e. diffusers' own loaders, exactly as a user of the
exported model would. Image i uses seed ``seed + i`` (the evaluation's convention), so a command
is reproducible image by image.
"""

from __future__ import annotations

import argparse
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sdsweep import io
from sdsweep.results.export import ExportError, select_trial, weights_dir
from sdsweep.results.study_folder import StudyFolderError, load_study


@dataclass
class Target:
    """What to generate with: a trial's weights, or the base model for ``baseline``."""

    label: str  # "t0003" | "baseline"
    config_path: Path
    weights: Path | None  # None: the untuned base model


def resolve_target(study_dir: Path, which: str) -> Target:
    from sdsweep.results.export import TRIAL_FILE
    from sdsweep.results.export_formats import EXPORT_CONFIG

    if (Path(study_dir) / TRIAL_FILE).is_file():  # a folder written by sdsweep.export, in any --format
        if not (Path(study_dir) / EXPORT_CONFIG).is_file():
            raise ExportError(
                f"{study_dir} has no {EXPORT_CONFIG}; export the trial again with this version."
            )
        summary = io.read_json(Path(study_dir) / TRIAL_FILE) or {}
        if which == "baseline":
            return Target("baseline", Path(study_dir) / EXPORT_CONFIG, None)
        return Target(
            f"t{int(summary.get('trial') or 0):04d}", Path(study_dir) / EXPORT_CONFIG, Path(study_dir)
        )
    data = load_study(study_dir)
    if which == "baseline":
        config_path = data.paths.baseline / io.TRIAL_CONFIG
        if not config_path.is_file():
            # Every trial shares the base model; any trial's config names it.
            trials = [p / io.TRIAL_CONFIG for p in data.paths.trial_dirs() if (p / io.TRIAL_CONFIG).is_file()]
            if not trials:
                raise ExportError(f"{study_dir} has neither baseline/{io.TRIAL_CONFIG} nor a trial config.")
            config_path = trials[0]
        return Target("baseline", config_path, None)
    if which != "best" and not which.isdigit():
        raise ExportError(f"--trial must be a trial number, 'best' or 'baseline', not {which!r}.")
    selected = select_trial(data, None if which == "best" else int(which))
    return Target(
        f"t{selected.number:04d}", selected.trial_dir / io.TRIAL_CONFIG, weights_dir(data, selected)
    )


def load_pipeline_for(target: Target, device: Any, scheduler: str | None):
    """(pipeline, cfg); imports torch/diffusers only here."""
    from sdsweep.config.load import load_yaml

    cfg = load_yaml(str(target.config_path))
    scheduler = scheduler or cfg.eval.scheduler
    if target.weights is None:
        from sdsweep.models.loading import load_pipeline, resolve_model_source

        pipeline = load_pipeline(resolve_model_source(cfg.model, cfg.paths.cache), scheduler, device)
    else:
        from sdsweep.results.export_formats import load_exported_pipeline

        pipeline = load_exported_pipeline(target.weights, cfg, device, scheduler)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline, cfg


def output_paths(out: Path, label: str, prompt: str, seeds: list[int]) -> list[Path]:
    """``--out x.png`` names the file (``x_1.png``... for several); any other --out is a folder."""
    if out.suffix.lower() == ".png":
        if len(seeds) == 1:
            return [out]
        return [out.with_name(f"{out.stem}_{i}{out.suffix}") for i in range(len(seeds))]
    slug = re.sub(r"[^a-z0-9]+", "-", prompt.lower()).strip("-")[:48] or "prompt"
    return [out / f"{label}_{slug}_s{seed}.png" for seed in seeds]


def generate(
    study_dir: Path,
    prompt: str,
    trial: str = "best",
    num_images: int = 4,
    seed: int = 0,
    steps: int = 25,
    guidance: float | None = None,
    scheduler: str | None = None,
    out: Path | None = None,
    device: str = "auto",
) -> list[Path]:
    """Generate ``num_images`` PNGs for ``prompt``; returns their paths."""
    import torch

    from sdsweep.config.resolve import resolved_resolution
    from sdsweep.models.loading import select_device

    target = resolve_target(study_dir, trial)
    torch_device = select_device(device)
    pipeline, cfg = load_pipeline_for(target, torch_device, scheduler)
    resolution = cfg.eval.resolution or resolved_resolution(cfg)
    seeds = [seed + i for i in range(num_images)]
    paths = output_paths(out or Path(study_dir) / "generated", target.label, prompt, seeds)
    for image_seed, path in zip(seeds, paths):
        generator = torch.Generator(device="cpu").manual_seed(
            image_seed
        )  # CPU generator: same images on any device
        image = pipeline(
            prompt,
            num_inference_steps=steps,
            guidance_scale=cfg.eval.guidance_scale if guidance is None else guidance,
            height=resolution,
            width=resolution,
            generator=generator,
        ).images[0]
        io.atomic_save_image(path, image)
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Generate images with a trial of a sdsweep study.")
    parser.add_argument("study_dir", type=Path, help="experiments/<study>, or a folder sdsweep.export wrote")
    parser.add_argument("--trial", default="best", help="a trial number, 'best' (default) or 'baseline'")
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--num-images", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0, help="image i uses seed + i")
    parser.add_argument("--steps", type=int, default=25, help="inference steps")
    parser.add_argument(
        "--guidance", type=float, default=None, help="guidance scale (default: the trial's eval setting)"
    )
    parser.add_argument(
        "--scheduler", default=None, help="dpmsolver++ | pndm | ddim | euler (default: the trial's)"
    )
    parser.add_argument(
        "--out", type=Path, default=None, help="a .png file or a folder (default: <study>/generated)"
    )
    parser.add_argument("--device", default="auto")
    args = parser.parse_args(argv)
    if args.num_images < 1 or args.steps < 1:
        parser.error("--num-images and --steps must be at least 1")
    try:
        paths = generate(
            args.study_dir,
            args.prompt,
            args.trial,
            args.num_images,
            args.seed,
            args.steps,
            args.guidance,
            args.scheduler,
            args.out,
            args.device,
        )
    except (ExportError, StudyFolderError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    for path in paths:
        print(path)
    print(f"{len(paths)} image(s) written to {paths[0].parent}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
