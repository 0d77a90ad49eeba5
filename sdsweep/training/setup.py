"""What training needs before its first step, built one way for every process that trains or evaluates a
method: the run (``sweep.run_setup.RunSetup``), the untuned baseline and the extra ranks of a data-parallel
run (``training.rank``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from sdsweep.config.schema import Config


@dataclass
class TrainingSetup:
    components: Any  # models.loading.SDComponents
    method: Any  # the prepared FineTuneMethod
    dataset: Any | None  # the training dataset; None when only evaluating (the baseline)


def build_training(
    cfg: Config, cache_dir: Path, device: torch.device, train_examples: list, with_dataset: bool = True
) -> TrainingSetup:
    """Load the model, build and prepare the method, and (``with_dataset``) the training dataset: cached
    latents when ``train.use_latent_cache``, under ``cache_dir`` (the study's cache/)."""
    from sdsweep.data.latent_cache import build_training_dataset
    from sdsweep.models.loading import load_components
    from sdsweep.training.methods import get_method

    components = load_components(cfg, device)
    method = get_method(cfg.method.name)(cfg, components, device, cache_dir=cache_dir)
    method.prepare()
    dataset = None
    if with_dataset:
        dataset = build_training_dataset(cfg, components, method, train_examples, cache_dir)
    return TrainingSetup(components, method, dataset)
