"""What a run loads before its first step (device, data, models, method, evaluator), and the per-process
caches that let the next run of the same study skip the parts that do not depend on training."""

from __future__ import annotations

import gc
from collections.abc import Callable
from typing import Any

import torch

from sdsweep import io
from sdsweep.config.load import to_yaml
from sdsweep.config.resolve import resolved_resolution
from sdsweep.config.schema import Config


class EvaluatorCache:
    """Holds the evaluator of the last study seen by this process.

    The evaluator (CLIP, safety checker, reference features) does not depend on training, so a process
    that runs several runs of a study builds it once. Only one is kept: a different study, eval section,
    model or held-out set replaces it, so a long-lived worker never piles up evaluators.
    """

    def __init__(self) -> None:
        self._key: tuple | None = None
        self._evaluator: Any = None

    @staticmethod
    def key_for(cfg: Config, paths: io.StudyPaths) -> tuple:
        return (
            str(paths.root),
            to_yaml(cfg.eval),
            cfg.model.name,
            cfg.data.kind,
            str(cfg.data.path),
            cfg.data.num_heldout,
        )

    def get(self, key: tuple, build: Callable[[], Any]) -> Any:
        if self._key != key:
            self._key, self._evaluator = None, None  # drop the old one before the new one loads its models
            self._evaluator = build()
            self._key = key
        return self._evaluator


class MemoryEstimates:
    """Memory predictions by model and footprint.

    The estimate depends only on the model's config files and the run's footprint (not on learning rate or
    steps), and tracing it costs ~1 s per run on 2 cores. Free memory changes between runs, so the fit
    itself is checked again every time.
    """

    def __init__(self) -> None:
        self._known: dict[tuple, Any] = {}

    def checked(self, cfg: Config, device: torch.device):
        """The run's predicted memory; raises the ConfigError that lists what would fit when it does not."""
        from sdsweep.models.loading import resolve_model_source
        from sdsweep.training.memory import check_fits, device_memory, footprint_from_config

        key = (
            str(device),
            resolve_model_source(cfg.model, cfg.paths.cache),
            footprint_from_config(cfg, device),
        )
        known = self._known.get(key)
        if known is not None:
            available = device_memory(device)
            if available is None or known.total <= available:
                return known
        estimate = check_fits(cfg, device)
        self._known[key] = estimate
        return estimate


class RunCaches:
    """The caches one process keeps across the runs it executes (owned by its SweepEngine)."""

    def __init__(self) -> None:
        self.evaluators = EvaluatorCache()
        self.memory = MemoryEstimates()


class RunSetup:
    """Everything a run needs before its first step; built once per run. ``train=False`` (the untuned
    baseline): the same model and prepared method, without the training dataset it would never use."""

    def __init__(self, cfg: Config, paths: io.StudyPaths, caches: RunCaches, train: bool = True):
        from sdsweep.data.examples import load_examples, split_examples
        from sdsweep.data.images import ImageCaptionDataset, collate, load_pil_images
        from sdsweep.evaluation.evaluate import Evaluator
        from sdsweep.models.loading import select_device
        from sdsweep.training.setup import build_training

        self.device = select_device(cfg.device)
        self.examples = examples = load_examples(cfg)
        self.train_examples, heldout = split_examples(examples, cfg.data.num_heldout)
        # Predicted before any weights load; on a GPU with too little memory the trial fails here with the
        # settings that would fit, instead of an OOM minutes later.
        self.memory = caches.memory.checked(cfg, self.device)
        print(f"memory: {self.memory.describe()}", flush=True)  # the preflight already told the user
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        training = build_training(cfg, paths.cache, self.device, self.train_examples, with_dataset=train)
        self.components, self.method, self.dataset = training.components, training.method, training.dataset
        validation_examples = heldout or self.train_examples[:2]
        val_set = ImageCaptionDataset(
            validation_examples,
            resolved_resolution(cfg),
            center_crop=True,
            random_flip=False,
            caption_transform=self.method.transform_caption,
        )
        batch = collate([val_set[i] for i in range(len(val_set))])
        self.heldout_batch = {
            k: (v.to(self.device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()
        }
        self.evaluator = caches.evaluators.get(
            EvaluatorCache.key_for(cfg, paths),
            lambda: Evaluator(
                cfg,
                paths,
                self.device,
                reference_images=load_pil_images(heldout or self.train_examples),
                instance_images=load_pil_images(self.train_examples),
                heldout_captions=[example.caption for example in heldout],
            ),
        )

    def memory_record(self) -> dict[str, float | None]:
        """The predicted peak next to the measured one (CUDA only), so the prediction can be checked on any GPU."""
        measured = None
        if self.device.type == "cuda":
            measured = round(torch.cuda.max_memory_allocated(self.device) / 2**30, 3)
        return {"predicted_peak_memory_gb": round(self.memory.total / 2**30, 3), "peak_memory_gb": measured}


def release_memory() -> None:
    """Return a finished run's memory before the next run loads its own models."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def evaluation_setup(cfg: Config, paths: io.StudyPaths, caches: RunCaches, device: torch.device):
    """The Evaluator a run of ``cfg`` would use (same reference and instance images from the same data
    split), without any training object: what confirmation rounds evaluate saved weights with."""
    from sdsweep.data.examples import load_examples, split_examples
    from sdsweep.data.images import load_pil_images
    from sdsweep.evaluation.evaluate import Evaluator

    train_examples, heldout = split_examples(load_examples(cfg), cfg.data.num_heldout)
    return caches.evaluators.get(
        EvaluatorCache.key_for(cfg, paths),
        lambda: Evaluator(
            cfg,
            paths,
            device,
            reference_images=load_pil_images(heldout or train_examples),
            instance_images=load_pil_images(train_examples),
            heldout_captions=[example.caption for example in heldout],
        ),
    )


def untuned_pipeline(cfg: Config, paths: io.StudyPaths, device: torch.device):
    """The baseline's pipeline: the base model prepared by the method (a textual-inversion token gets its
    initial embedding), untrained, exactly as ``execute_baseline`` evaluates it."""
    from sdsweep.training.setup import build_training

    method = build_training(cfg, paths.cache, device, [], with_dataset=False).method
    return method.pipeline_for_eval(cfg.eval.scheduler)
