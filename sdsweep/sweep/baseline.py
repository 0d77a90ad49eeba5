"""The untuned baseline: where it lives, and evaluating it once per study (per model when models are swept).

Trials are compared with it (``delta/*`` metrics), with the same prompts, seeds and metrics.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from sdsweep import io
from sdsweep.config.load import to_yaml
from sdsweep.config.schema import Config, SweepConfig
from sdsweep.study.record import TrialRecord, TrialState, read_record_or_none
from sdsweep.sweep.run_config import build_config
from sdsweep.sweep.run_setup import RunCaches, RunSetup, release_memory
from sdsweep.sweep.run_spec import RunSpec


def baseline_folder(paths: io.StudyPaths, cfg: Config) -> Path:
    """``baseline/<model>/`` when the sweep switches models, so each model version is compared with its own
    untuned self; ``baseline/`` otherwise."""
    return paths.baseline / cfg.model.name if "model" in cfg.sweep.params else paths.baseline


def baseline_metrics(folder: Path) -> dict[str, float]:
    """The baseline's numeric metrics; empty when there is none (eval.baseline=false or not yet run)."""
    record = read_record_or_none(folder / io.TRIAL_METRICS)
    return record.numeric_metrics() if record else {}


def baseline_overrides(sweep: SweepConfig, overrides: list[str]) -> list[list[str]]:
    """One baseline per model the sweep can choose (each version has its own untuned baseline)."""
    spec = sweep.params.get("model")
    if spec is None or not spec.choices:
        return [overrides]
    others = [o for o in overrides if not o.lstrip("+~").startswith("model=")]
    return [others + [f"model={choice}"] for choice in spec.choices]


def baseline_done(sweep: SweepConfig, paths: io.StudyPaths) -> bool:
    spec = sweep.params.get("model")
    folders = [paths.baseline / str(m) for m in spec.choices] if spec and spec.choices else [paths.baseline]
    records = [read_record_or_none(folder / io.TRIAL_METRICS) for folder in folders]
    return all(record is not None and record.complete for record in records)


def ensure_baseline(
    cfg: Config,
    paths: io.StudyPaths,
    overrides: list[str],
    storage: str,
    caches: RunCaches,
    say: Callable[[str], None],
) -> None:
    """Evaluate the untuned model once per study folder; a file lock makes concurrent workers wait."""
    if not cfg.eval.baseline or baseline_done(cfg.sweep, paths):
        return
    paths.root.mkdir(parents=True, exist_ok=True)
    with io.file_lock(paths.root / ".baseline.lock"):
        if baseline_done(cfg.sweep, paths):
            return
        say("evaluating the untuned base model once for this study (baseline)")
        for model_overrides in baseline_overrides(cfg.sweep, overrides):
            # The sweep's config when no model is swept; else each model's, built once here.
            model_cfg = cfg if model_overrides == overrides else build_config(model_overrides)
            spec = RunSpec(
                study=cfg.study,
                study_root=str(paths.root.resolve()),
                storage=storage,
                overrides=model_overrides,
                config=to_yaml(model_cfg),
            )
            execute_baseline(spec, caches)  # returns at once for a model whose baseline exists


def execute_baseline(spec: RunSpec, caches: RunCaches) -> TrialRecord:
    """Evaluate the untuned model once per study, with the trials' prompts, seeds and metrics."""
    paths = io.StudyPaths(Path(spec.study_root))
    cfg = spec.typed_config()
    folder = baseline_folder(paths, cfg)
    existing = read_record_or_none(folder / io.TRIAL_METRICS)
    if existing and existing.complete:
        return existing
    setup = RunSetup(cfg, paths, caches, train=False)  # evaluated untuned: no training dataset
    pipeline = setup.method.pipeline_for_eval(cfg.eval.scheduler)
    result = setup.evaluator.evaluate(
        pipeline, setup.method, setup.heldout_batch, out_dir=folder, label=f"baseline {cfg.model.name}"
    )
    record = TrialRecord(
        trial=None,
        state=TrialState.COMPLETE,
        step=0,
        model=cfg.model.name,
        method=cfg.method.name,
        metrics=result.metrics,
        missing=result.missing,
        warnings=result.warnings,
        eval_seconds=result.seconds,
        intervals={k: i.to_json() for k, i in result.intervals.items()},
    )
    io.atomic_write_text(folder / io.TRIAL_CONFIG, to_yaml(cfg))
    record.write(folder / io.TRIAL_METRICS)
    del setup, pipeline
    release_memory()
    return record
