"""Execute one training run and record the trial(s) it serves.

A run is described by a JSON-serialisable ``RunSpec`` so the same code runs in-process or in an
isolated worker process (``python -m sdsweep.sweep.worker``). The training loop is given hooks; this module
decides what happens at each milestone: evaluate, save weights, tell Optuna, log to tracking.
"""

from __future__ import annotations

import copy
import dataclasses
import gc
import json
import math
import os
import shutil
import signal
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import optuna
import torch

from sdsweep import io, signals
from sdsweep.config.constraints import parse_constraint
from sdsweep.config.load import to_yaml
from sdsweep.config.resolve import resolved_resolution
from sdsweep.config.schema import Config
from sdsweep.progress import Progress
from sdsweep.results.record import TrialRecord, TrialState, read_record, read_record_or_none
from sdsweep.sweep.study_store import (
    RUN_KEY,
    TRIAL_DIR,
    VIOLATIONS,
    WANDB_RUN_ID,
    StudyHandle,
    TrialLink,
    objective_values,
)
from sdsweep.training import distributed

# Test-only fault injection: SDSWEEP_FAULT=after_record makes the process SIGKILL itself right after a
# trial's metrics.json is written and before Optuna is told (tests/test_parallel.py checks that
# keep_best_k and resume handle that window). Never set it outside tests.
FAULT = os.environ.get("SDSWEEP_FAULT", "")
# Errors from telling a trial that someone else already finished (it was taken over as stale).
TAKEN_OVER = (optuna.exceptions.UpdateFinishedTrialError, RuntimeError, ValueError)


@dataclass
class TrialSlot:
    """A grid point served by a run: its Optuna trial and the step at which it is evaluated."""

    number: int
    trial_id: int
    step: int
    params: dict[str, Any]


@dataclass
class RunSpec:
    kind: str  # "train" | "baseline"
    study: str
    study_root: str
    storage: str
    overrides: list[str]  # Hydra overrides that rebuild this run's config from conf/
    run_key: str = ""
    slots: list[TrialSlot] = field(default_factory=list)
    shared: bool = False  # one run evaluated at several milestones
    report_every: int = 0  # extra val-loss points for pruning (0: only at milestones)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str) -> RunSpec:
        raw = json.loads(text)
        raw["slots"] = [TrialSlot(**s) for s in raw["slots"]]
        return cls(**raw)


class TrialRecorder:
    """Writes a trial's folder and tells Optuna and tracking, in that order, so files exist first."""

    def __init__(self, cfg: Config, spec: RunSpec, paths: io.StudyPaths, baseline: dict[str, float]):
        self.cfg = cfg
        self.spec = spec
        self.paths = paths
        self.baseline = baseline
        self.constraints = [parse_constraint(c) for c in cfg.sweep.constraints]
        self.handle = StudyHandle(cfg, spec.storage, spec.study)
        self.study = self.handle.study
        from sdsweep.sweep import tracking

        self.live = tracking.LiveTrialRuns(cfg, spec.study, spec.slots, paths.wandb)  # W&B while training

    def link(self, slot: TrialSlot) -> TrialLink:
        link = TrialLink(self.handle, slot.number)
        link.set_attr(RUN_KEY, self.spec.run_key)
        link.set_attr(TRIAL_DIR, str(self.paths.trial(slot.number)))
        return link

    def tell(self, slot: TrialSlot, action) -> None:
        """Tell Optuna; a trial finished by someone else meanwhile (taken over as stale) is left alone."""
        try:
            action()
        except TAKEN_OVER as error:
            print(
                f"[sdsweep] trial {slot.number} was taken over by another worker ({error}); its result is kept on disk only",
                flush=True,
            )

    def base_record(self, slot: TrialSlot) -> TrialRecord:
        return TrialRecord(
            trial=slot.number,
            params=slot.params,
            step=slot.step,
            model=self.cfg.model.name,
            pretrained=self.cfg.model.path or self.cfg.model.pretrained,
            method=self.cfg.method.name,
            learning_rate=self.cfg.method.learning_rate,
            max_train_steps=slot.step,
            run_key=self.spec.run_key,
        )

    def write_config(self, slot: TrialSlot) -> None:
        trial_dir = self.paths.trial(slot.number)
        trial_dir.mkdir(parents=True, exist_ok=True)
        # The saved config reproduces this grid point exactly (a shared run trains further).
        own = dataclasses.replace(
            self.cfg, train=dataclasses.replace(self.cfg.train, max_train_steps=slot.step)
        )
        io.atomic_write_text(trial_dir / io.TRIAL_CONFIG, to_yaml(own))

    def complete(self, slot: TrialSlot, record: TrialRecord, link: TrialLink) -> None:
        metrics = record.metrics
        record.delta = {
            f"delta/{k}": metrics[k] - v
            for k, v in self.baseline.items()
            if k in metrics and isinstance(v, (int, float)) and metrics[k] is not None
        }
        violations = [c.violation(metrics) for c in self.constraints]
        record.violations = {str(c): v for c, v in zip(self.constraints, violations)}
        record.feasible = all(v <= 0 for v in violations)
        values = objective_values(self.cfg, metrics)
        if isinstance(values, str):
            reason = f"{values}: {record.missing.get(self.cfg.sweep.objectives[0].metric.split('/', 1)[-1], '')}".rstrip(
                ": "
            )
            self.fail(slot, record, link, reason)
            return
        record.state = TrialState.COMPLETE
        record.objective = values[0]
        record.write(self.paths.trial(slot.number) / io.TRIAL_METRICS)
        if FAULT == "after_record":
            os.kill(os.getpid(), signal.SIGKILL)
        for name, value in metrics.items():  # every metric readable per trial in the dashboard
            if isinstance(value, (int, float)) and math.isfinite(value):
                self.tell(slot, lambda n=name, v=value: link.set_attr(n, float(v)))
        self.tell(slot, lambda: link.complete(values, record.violations))

    def fail(
        self,
        slot: TrialSlot,
        record: TrialRecord,
        link: TrialLink,
        reason: str,
        state: TrialState = TrialState.FAIL,
    ) -> None:
        record.state = state
        record.fail_reason = reason
        record.write(self.paths.trial(slot.number) / io.TRIAL_METRICS)
        self.tell(slot, lambda: link.prune(reason) if state == TrialState.PRUNED else link.fail(reason))

    def track(self, slot: TrialSlot, record: TrialRecord, images: dict) -> None:
        from sdsweep.sweep import tracking

        run_id = self.live.finish(slot.number, record) or tracking.record_trial(
            self.cfg, self.spec.study, slot.number, slot.params, record, images, self.paths.wandb
        )
        if run_id:
            record.wandb_run_id = run_id
            record.write(self.paths.trial(slot.number) / io.TRIAL_METRICS)
            self.handle.set_attr(slot.number, WANDB_RUN_ID, run_id)  # False once finished: kept on disk


# Per-process memo of composed configs: the driver composes the same overrides for the preflight and again
# for the sweep (Hydra takes ~0.5 s each on 2 cores, before any worker can start), a worker for its engine
# and each baseline. Keyed by the overrides and the conf files' stamps, so an edited conf/ is composed
# afresh; callers get a deep copy (a Config is mutable).
_COMPOSED: dict[tuple, Config] = {}


def _conf_stamp() -> tuple:
    from sdsweep.config.compose import CONF_DIR

    return tuple((str(f), f.stat().st_mtime_ns, f.stat().st_size) for f in sorted(CONF_DIR.rglob("*.yaml")))


def compose_config(overrides: list[str]) -> Config:
    from sdsweep.config.compose import compose_typed
    from sdsweep.sweep.study_store import single_run_sweep

    key = (tuple(overrides), _conf_stamp())
    if key not in _COMPOSED:
        cfg = compose_typed(overrides)
        if cfg.sweep is None:
            cfg.sweep = single_run_sweep()
        if len(_COMPOSED) > 64:
            _COMPOSED.clear()
        _COMPOSED[key] = with_placeholder_prompts(cfg)
    return copy.deepcopy(_COMPOSED[key])


def with_placeholder_prompts(cfg: Config) -> Config:
    """Textual inversion learns a new token: evaluation prompts must use it instead of the trigger word."""
    trigger, placeholder = cfg.data.trigger_word, cfg.method.placeholder_token
    if cfg.method.name == "textual_inversion" and trigger and trigger != placeholder:
        cfg.eval.prompts = [
            " ".join(placeholder if w == trigger else w for w in p.split()) for p in cfg.eval.prompts
        ]
    return cfg


def memory_record(setup: _Setup | None) -> dict[str, float | None]:
    """The predicted peak next to the measured one (CUDA only), so the prediction can be checked on any GPU."""
    if setup is None:
        return {}
    measured = None
    if setup.device.type == "cuda":
        measured = round(torch.cuda.max_memory_allocated(setup.device) / 2**30, 3)
    return {"predicted_peak_memory_gb": round(setup.memory.total / 2**30, 3), "peak_memory_gb": measured}


def release_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def baseline_folder(paths: io.StudyPaths, cfg: Config) -> Path:
    """``baseline/<model>/`` when the sweep switches models, so each model version is compared with its own
    untuned self; ``baseline/`` otherwise."""
    return paths.baseline / cfg.model.name if "model" in cfg.sweep.params else paths.baseline


def _load_baseline(folder: Path) -> dict[str, float]:
    record = read_record_or_none(folder / io.TRIAL_METRICS)
    return record.numeric_metrics() if record else {}


_EVALUATORS: dict[str, Any] = {}
# Per-process memo of memory predictions: the estimate depends only on the model's config files and the
# run's footprint (not on learning rate or steps), and tracing it costs ~1 s per run on 2 cores.
_ESTIMATES: dict[tuple, Any] = {}


def _checked_memory(cfg: Config, device: torch.device):
    from sdsweep.models.loading import resolve_model_source
    from sdsweep.training.memory import check_fits, device_memory, footprint_from_config

    key = (str(device), resolve_model_source(cfg.model, cfg.paths.cache), footprint_from_config(cfg, device))
    known = _ESTIMATES.get(key)
    if known is not None:
        available = device_memory(device)  # free memory changes: the fit is checked again every run
        if available is None or known.total <= available:
            return known
    estimate = check_fits(cfg, device)  # raises the ConfigError that lists what would fit
    _ESTIMATES[key] = estimate
    return estimate


class _Setup:
    """Everything a run needs before its first step; built once per run."""

    def __init__(self, cfg: Config, paths: io.StudyPaths):
        from sdsweep.data.examples import load_examples, split_examples
        from sdsweep.data.images import ImageCaptionDataset, collate, load_pil_images
        from sdsweep.data.latent_cache import build_training_dataset
        from sdsweep.evaluation.evaluate import Evaluator
        from sdsweep.models.loading import load_components, select_device
        from sdsweep.training.methods import get_method

        self.device = select_device(cfg.device)
        examples = load_examples(cfg)
        self.train_examples, heldout = split_examples(examples, cfg.data.num_heldout)
        # Predicted before any weights load; on a GPU with too little memory the trial fails here with the
        # settings that would fit, instead of an OOM minutes later.
        self.memory = _checked_memory(cfg, self.device)
        print(f"[sdsweep] {self.memory.describe()}", flush=True)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        self.components = load_components(cfg, self.device)
        self.method = get_method(cfg.method.name)(cfg, self.components, self.device, cache_dir=paths.cache)
        self.method.prepare()
        self.dataset = build_training_dataset(
            cfg, self.components, self.method, self.train_examples, paths.cache
        )
        validation_examples = heldout or self.train_examples[:2]
        val_set = ImageCaptionDataset(
            validation_examples,
            resolved_resolution(cfg),
            center_crop=True,
            random_flip=False,
            caption_transform=self.method.transform_caption,
        )
        self.heldout_batch = collate([val_set[i] for i in range(len(val_set))])
        self.heldout_batch = {
            k: (v.to(self.device) if isinstance(v, torch.Tensor) else v)
            for k, v in self.heldout_batch.items()
        }
        # The evaluator (CLIP, safety checker, reference features) does not depend on training, so
        # in-process sweeps build it once and every later run of the study reuses it.
        key = (
            str(paths.root),
            to_yaml(cfg.eval),
            cfg.model.name,
            cfg.data.kind,
            str(cfg.data.path),
            cfg.data.num_heldout,
        )
        if _EVALUATORS.get("key") != key:
            _EVALUATORS.clear()
            _EVALUATORS["key"] = key
            _EVALUATORS["evaluator"] = Evaluator(
                cfg,
                paths,
                self.device,
                reference_images=load_pil_images(heldout or self.train_examples),
                instance_images=load_pil_images(self.train_examples),
                heldout_captions=[example.caption for example in heldout],
            )
        self.evaluator = _EVALUATORS["evaluator"]


def execute_baseline(spec: RunSpec) -> TrialRecord:
    """Evaluate the untuned model once per study, with the trials' prompts, seeds and metrics."""
    paths = io.StudyPaths(Path(spec.study_root))
    cfg = compose_config(spec.overrides)
    folder = baseline_folder(paths, cfg)
    existing = read_record_or_none(folder / io.TRIAL_METRICS)
    if existing and existing.complete:
        return existing
    setup = _Setup(cfg, paths)
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
    )
    io.atomic_write_text(folder / io.TRIAL_CONFIG, to_yaml(cfg))
    record.write(folder / io.TRIAL_METRICS)
    del setup, pipeline
    release_memory()
    return record


def execute_run(spec: RunSpec) -> None:
    """Train once and record every trial slot of the run; failures are recorded, never raised."""
    from sdsweep.training.train import TrainHooks, TrainingDiverged, train

    paths = io.StudyPaths(Path(spec.study_root))
    cfg = compose_config(spec.overrides)
    baseline = _load_baseline(baseline_folder(paths, cfg))
    recorder = TrialRecorder(cfg, spec, paths, baseline)
    slots = sorted(spec.slots, key=lambda s: s.step)
    links = {s.number: recorder.link(s) for s in slots}
    records = {s.number: recorder.base_record(s) for s in slots}
    for slot in slots:
        recorder.write_config(slot)
    open_slots = list(slots)
    history: list[dict[str, Any]] = []
    evals: list[dict[str, Any]] = []
    grids: list[tuple[int, Any]] = []
    direction_sign = -1.0 if recorder.study.directions[0].name == "MAXIMIZE" else 1.0
    t_start = time.perf_counter()
    setup = None
    bar = Progress(
        f"train {'/'.join(f't{s.number}' for s in slots)}",
        slots[-1].step,
        "steps",
        time_from_first_update=True,
    )

    def finish_slot(slot: TrialSlot, state: TrialState, reason: str | None = None) -> None:
        record = records[slot.number]
        record.history = [h for h in history if h["step"] <= slot.step]
        record.evals = [e for e in evals if e["step"] <= slot.step]
        record.train_seconds = round(time.perf_counter() - t_start, 3)
        for key, value in memory_record(setup).items():
            setattr(record, key, value)
        if state == TrialState.COMPLETE:
            recorder.complete(slot, record, links[slot.number])
        else:
            recorder.fail(slot, record, links[slot.number], reason or "unknown", state=state)
        images = {"eval/grid": [g for g in grids if g[0] <= slot.step]}
        recorder.track(slot, record, images)
        _enforce_keep_best_k(cfg, paths, recorder.handle)
        open_slots.remove(slot)

    def on_step(step: int, logs: dict[str, float]) -> None:
        history.append({"step": step, **logs})
        recorder.live.log_step(step, logs)
        bar.update(step, loss=logs.get("train/loss"))

    def on_milestone(step: int) -> bool:
        """Evaluate the slot ending here; report val_loss to the still-open slots; decide to stop."""
        nonlocal setup
        ending = [s for s in open_slots if s.step == step]
        val_loss = None
        for slot in ending:
            trial_dir = paths.trial(slot.number)
            pipeline = setup.method.pipeline_for_eval(cfg.eval.scheduler)
            result = setup.evaluator.evaluate(
                pipeline,
                setup.method,
                setup.heldout_batch,
                out_dir=trial_dir,
                label=f"trial {slot.number} step {step}",
            )
            del pipeline
            record = records[slot.number]
            record.metrics, record.missing = result.metrics, result.missing
            record.warnings = result.warnings
            record.eval_seconds = round(result.seconds, 3)
            evals.append({"step": step, **result.metrics})
            recorder.live.log_eval(step, result.metrics, result.grid)
            grids.append((step, result.grid))
            weights = trial_dir / io.TRIAL_WEIGHTS
            with signals.critical():  # a Ctrl-C here waits until the trial is recorded
                staging = io.staging_dir(weights)
                setup.method.save(staging)
                io.replace_dir(staging, weights)
                record.weights = io.TRIAL_WEIGHTS
                val_loss = result.metrics.get("eval/val_loss")
                finish_slot(slot, TrialState.COMPLETE)
            rate = result.metrics.get("eval/appropriate_rate")
            if rate is not None and rate == 0.0 and open_slots:
                reason = f"stopped: eval/appropriate_rate collapsed to 0 at step {step} (every image degenerate or unsafe)"
                for other in list(open_slots):
                    finish_slot(other, TrialState.PRUNED, reason)
                return True
        if not open_slots:
            return True
        if val_loss is None:
            val_loss = setup.evaluator.val_loss_only(setup.method, setup.heldout_batch)
        representative = links[open_slots[-1].number]
        for slot in open_slots:
            links[slot.number].report(direction_sign * float(val_loss), step)
        if representative.should_prune():
            reason = f"pruned at step {step} by the {cfg.sweep.pruner} pruner (val_loss {val_loss:.4g})"
            for other in list(open_slots):
                finish_slot(other, TrialState.PRUNED, reason)
            return True
        return False

    try:
        milestones = sorted({s.step for s in slots})
        if spec.report_every:
            milestones = sorted(
                set(milestones) | set(range(spec.report_every, max(milestones), spec.report_every))
            )
        checkpoint_dir = (
            paths.runs / spec.run_key if spec.shared and cfg.train.checkpoint_at_milestones else None
        )
        label = spec.run_key or f"t{slots[0].number}"
        # train.num_processes > 1: the other ranks start now and load their models alongside ours.
        with distributed.Ranks(
            cfg, spec.overrides, paths.root, paths.runs, milestones, checkpoint_dir, label
        ):
            setup = _Setup(cfg, paths)
            train(
                cfg,
                setup.method,
                setup.dataset,
                milestones,
                TrainHooks(on_step=on_step, on_milestone=on_milestone),
                checkpoint_dir,
            )
        if not open_slots and checkpoint_dir is not None:
            # Every milestone is recorded: nothing is left to resume from.
            shutil.rmtree(checkpoint_dir, ignore_errors=True)
    except signals.HandBack:
        open_slots.clear()  # not failed: the caller hands these trials back to the study
        raise
    except TrainingDiverged as error:
        for slot in list(open_slots):
            finish_slot(slot, TrialState.FAIL, f"training diverged: {error}")
    except torch.OutOfMemoryError:
        for slot in list(open_slots):
            finish_slot(
                slot,
                TrialState.FAIL,
                "out of memory: lower train.train_batch_size, enable train.gradient_checkpointing=true, "
                "or use method=lora",
            )
    except Exception as error:  # a trial's bug must not stop the sweep
        reason = f"{type(error).__name__}: {error}"
        for slot in list(open_slots):
            trial_dir = paths.trial(slot.number)
            io.atomic_write_text(trial_dir / "error.txt", traceback.format_exc())
            finish_slot(slot, TrialState.FAIL, reason)
    finally:
        for slot in list(open_slots):  # the loop ended before this milestone (should not happen)
            finish_slot(slot, TrialState.FAIL, f"training stopped before step {slot.step}")
        bar.close()
        setup = None  # drop the models before the next run loads its own
        release_memory()


def _enforce_keep_best_k(cfg: Config, paths: io.StudyPaths, handle: StudyHandle) -> None:
    """Keep weights only for the best k COMPLETE trials in the storage (feasible first).

    The ranking comes from the study, not from trial folders: a folder whose metrics.json says
    COMPLETE but whose trial was never told (killed in between) is not a result and is never ranked.
    Safe with concurrent workers: a trial outside the top k of some snapshot of the study stays
    outside it when more trials finish, and the best trial so far is always inside it. The record
    says so before any file is deleted.
    """
    k = cfg.sweep.keep_best_k
    if k < 0:
        return
    sign = 1.0 if cfg.sweep.objectives[0].direction == "maximize" else -1.0
    ranked = []
    unranked = []
    for frozen in handle.trials():
        if frozen.state.is_finished():
            _remove_staging(paths.trial(frozen.number))  # left by a save that was killed
        if frozen.state.is_finished() and frozen.state != optuna.trial.TrialState.COMPLETE:
            unranked.append(frozen.number)  # e.g. killed after its save and retried: not a result
        if frozen.state != optuna.trial.TrialState.COMPLETE or not frozen.values:
            continue
        score = sign * frozen.values[0] if math.isfinite(frozen.values[0]) else -math.inf
        violations = frozen.user_attrs.get(VIOLATIONS) or {}
        feasible = all(float(v) <= 0 for v in violations.values())
        ranked.append((not feasible, -score, frozen.number))
    ranked.sort()
    losers = [(number, f"not among the best {k} (sweep.keep_best_k)") for _, _, number in ranked[k:]]
    losers += [(number, "this attempt has no result in the study (sweep.keep_best_k)") for number in unranked]
    for number, why in losers:
        trial_dir = paths.trial(number)
        record = read_record(trial_dir / io.TRIAL_METRICS)
        if not record or not record.weights:
            continue
        record.weights = None
        record.weights_removed = why
        record.write(trial_dir / io.TRIAL_METRICS)
        shutil.rmtree(trial_dir / io.TRIAL_WEIGHTS, ignore_errors=True)


def _remove_staging(trial_dir: Path) -> None:
    for leftover in trial_dir.glob(f".{io.TRIAL_WEIGHTS}.*.staging"):
        shutil.rmtree(leftover, ignore_errors=True)


__all__ = ["RunSpec", "TrialSlot", "compose_config", "execute_run", "execute_baseline"]
