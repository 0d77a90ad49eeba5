"""Execute one training run and record the trial(s) it serves.

``RunExecutor`` holds a run's state as attributes and has one method per phase: ``setup`` and training
(``run``), each logged step (``on_step``), each milestone (``on_milestone``: evaluate, save weights, tell
Optuna, decide whether to stop), and ``finish_slot`` / ``fail_open`` for the trials it serves. The
training loop only sees the two hooks; recording is ``TrialRecorder``'s job (sdsweep/sweep/recorder.py).
"""

from __future__ import annotations

import shutil
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from sdsweep import io, signals
from sdsweep.config.schema import Config
from sdsweep.metric_names import is_internal
from sdsweep.progress import Progress
from sdsweep.study.plan import short_params
from sdsweep.study.record import TrialRecord, TrialState
from sdsweep.study.store import StudyHandle
from sdsweep.study.trial_tags import Fate, fate_of_error
from sdsweep.sweep.baseline import baseline_folder, baseline_metrics
from sdsweep.sweep.claims import RunTakenOver
from sdsweep.sweep.fingerprint import StudyMismatchError, check_study_unchanged, raise_if_data_changed
from sdsweep.sweep.recorder import TrialRecorder, enforce_keep_best_k
from sdsweep.sweep.run_setup import RunCaches, RunSetup, release_memory
from sdsweep.sweep.run_spec import RunSpec, TrialSlot
from sdsweep.training import distributed

WORKER_PROGRESS_SECONDS = 15.0  # a pool worker's training progress line, on the user's terminal
OUT_OF_MEMORY = "out of memory: lower train.train_batch_size, enable train.gradient_checkpointing=true, or use method=lora"


class RunExecutor:
    """Trains once and records every trial slot of the run; failures are recorded, never raised."""

    def __init__(
        self,
        spec: RunSpec,
        caches: RunCaches,
        still_owned: Callable[[], None] | None = None,
        say: Callable[[str], None] | None = None,
        label: str = "driver",
        handle: StudyHandle | None = None,
    ):
        self.spec = spec
        self.caches = caches
        # Raises RunTakenOver once another process has taken this run over (checked every step).
        self.still_owned = still_owned or (lambda: None)
        self.say = say or (lambda message: print(f"[sdsweep] {message}", flush=True))
        self.paths = io.StudyPaths(Path(spec.study_root))
        self.cfg = spec.typed_config()
        base = baseline_folder(self.paths, self.cfg)
        self.recorder = TrialRecorder(self.cfg, spec, self.paths, baseline_metrics(base), base, handle)
        self.slots = sorted(spec.slots, key=lambda s: s.step)
        self.links = {s.number: self.recorder.link(s) for s in self.slots}
        self.records: dict[int, TrialRecord] = {s.number: self.recorder.base_record(s) for s in self.slots}
        self.open_slots = list(self.slots)  # served slots not yet recorded, in step order
        self.history: list[dict[str, Any]] = []  # every logged training step
        self.evals: list[dict[str, Any]] = []  # every milestone's metrics
        self.grids: list[tuple[int, Any]] = []  # (step, image grid) per milestone
        # Optuna's pruners compare reported values in the objective's direction; val_loss is reported with
        # the sign that makes a lower loss look better for a maximised objective too.
        self.direction_sign = -1.0 if self.recorder.study.directions[0].name == "MAXIMIZE" else 1.0
        self.started = time.perf_counter()
        self.setup: RunSetup | None = None
        trials = "/".join(f"t{s.number}" for s in self.slots)
        # A pool worker's output reaches the user through the driver, which shows "[sdsweep]" lines: its
        # training progress is such a line (every WORKER_PROGRESS_SECONDS), named after the worker.
        in_worker = label != "driver"
        self.bar = Progress(
            f"[sdsweep] {label}: train {trials}" if in_worker else f"train {trials}",
            self.slots[-1].step,
            "steps",
            time_from_first_update=True,
            **({"plain_every": WORKER_PROGRESS_SECONDS} if in_worker else {}),
        )

    # ---- the run ------------------------------------------------------------------------------------
    def run(self) -> None:
        from sdsweep.training.train import TrainingDiverged

        for slot in self.slots:
            self.recorder.write_config(slot)
        try:
            self.train()
        except (signals.HandBack, RunTakenOver, StudyMismatchError):
            # Not failed: a stop (or data changed before the run loaded it) hands these trials back to the
            # study; a take-over leaves them to their new owner. Either way nothing more is recorded here.
            self.open_slots.clear()
            raise
        except TrainingDiverged as error:
            self.fail_open(f"training diverged: {error}", Fate.DIVERGED)
        except torch.OutOfMemoryError:
            self.fail_open(OUT_OF_MEMORY, Fate.OUT_OF_MEMORY)
        except Exception as error:  # a trial's bug must not stop the sweep
            for slot in self.open_slots:
                io.atomic_write_text(self.paths.trial(slot.number) / "error.txt", traceback.format_exc())
            self.fail_open(f"{type(error).__name__}: {error}", fate_of_error(error), type(error).__name__)
        finally:
            for slot in list(self.open_slots):  # the loop ended before this milestone (should not happen)
                self.finish_slot(slot, TrialState.FAIL, f"training stopped before step {slot.step}")
            self.bar.close()
            self.setup = None  # drop the models before the next run loads its own
            release_memory()

    def milestones(self) -> list[int]:
        """The slots' steps, plus the extra val-loss points the pruner asks for."""
        steps = {s.step for s in self.slots}
        every = self.spec.report_every
        if every:
            steps |= set(range(every, max(steps), every))
        return sorted(steps)

    def checkpoint_dir(self) -> Path | None:
        """Where a shared run checkpoints at milestones, so a taken-over run resumes instead of restarting."""
        if self.spec.shared and self.cfg.train.checkpoint_at_milestones:
            return self.paths.runs / self.spec.run_key
        return None

    def train(self) -> None:
        from sdsweep.training.train import TrainHooks, train

        milestones = self.milestones()
        checkpoint_dir = self.checkpoint_dir()
        label = self.spec.run_key or f"t{self.slots[0].number}"
        # train.num_processes > 1: the other ranks start now and load their models alongside ours.
        with distributed.Ranks(self.cfg, self.paths.root, self.paths.runs, milestones, checkpoint_dir, label):
            try:
                self.setup = RunSetup(self.cfg, self.paths, self.caches)
            except Exception as error:
                raise_if_data_changed(self.cfg, self.paths, error)  # handed back, not failed
                raise
            # The data this run loaded must be the study's: a file changed before it was read is not
            # trained on (the run is handed back and the sweep stops); one changed later is not read.
            check_study_unchanged(self.cfg, self.paths, self.setup.examples, data_only=True)
            hooks = TrainHooks(on_step=self.on_step, on_milestone=self.on_milestone)
            train(self.cfg, self.setup.method, self.setup.dataset, milestones, hooks, checkpoint_dir)
        if not self.open_slots and checkpoint_dir is not None:
            shutil.rmtree(
                checkpoint_dir, ignore_errors=True
            )  # every milestone is recorded: nothing to resume

    # ---- the training loop's hooks ------------------------------------------------------------------
    def on_step(self, step: int, logs: dict[str, float]) -> None:
        self.still_owned()
        self.history.append({"step": step, **logs})
        self.recorder.live.log_step(step, logs)
        self.bar.update(step, loss=logs.get("train/loss"))

    def on_milestone(self, step: int) -> bool:
        """Evaluate the slots ending here; report val_loss to the still-open slots; True: stop training."""
        self.still_owned()  # a run taken over meanwhile records nothing more
        val_loss = None
        for slot in [s for s in self.open_slots if s.step == step]:
            metrics = self.evaluate_and_record(slot, step)
            val_loss = metrics.get("eval/val_loss")
            rate = metrics.get("eval/appropriate_rate")
            if rate is not None and rate == 0.0 and self.open_slots:
                self.stop_open(
                    TrialState.PRUNED,
                    f"stopped: eval/appropriate_rate collapsed to 0 at step {step} (every image degenerate or unsafe)",
                )
                return True
            paired = self.cfg.sweep.pruner == "wilcoxon" and self.open_slots
            worse = paired_prune_reason(self.cfg, self.paths, slot.number) if paired else None
            if worse:
                self.stop_open(TrialState.PRUNED, f"pruned at step {step}: {worse}")
                return True
        if not self.open_slots:
            return True
        assert self.setup is not None
        if self.cfg.sweep.pruner == "wilcoxon":  # judged on evaluations above, not on val_loss
            return False
        if val_loss is None:
            val_loss = self.setup.evaluator.val_loss_only(self.setup.method, self.setup.heldout_batch)
        for slot in self.open_slots:
            self.links[slot.number].report(self.direction_sign * float(val_loss), step)
        # Every open slot shares the training so far: the longest one speaks for all of them.
        if self.links[self.open_slots[-1].number].should_prune():
            self.stop_open(
                TrialState.PRUNED,
                f"pruned at step {step} by the {self.cfg.sweep.pruner} pruner (val_loss {val_loss:.4g})",
            )
            return True
        return False

    def evaluate_and_record(self, slot: TrialSlot, step: int) -> dict[str, Any]:
        """Evaluate the slot ending at this step, save its weights and record it COMPLETE; its metrics."""
        setup = self.setup
        assert setup is not None
        trial_dir = self.paths.trial(slot.number)
        pipeline = setup.method.pipeline_for_eval(self.cfg.eval.scheduler)
        result = setup.evaluator.evaluate(
            pipeline,
            setup.method,
            setup.heldout_batch,
            out_dir=trial_dir,
            label=f"trial {slot.number} step {step}",
        )
        del pipeline
        record = self.records[slot.number]
        record.metrics, record.missing = result.metrics, result.missing
        record.warnings = result.warnings
        record.intervals = {k: i.to_json() for k, i in result.intervals.items()}
        record.eval_seconds = round(result.seconds, 3)
        self.evals.append({"step": step, **result.metrics})
        self.recorder.live.log_eval(step, result.metrics, result.grid)
        self.grids.append((step, result.grid))
        weights = trial_dir / io.TRIAL_WEIGHTS
        with signals.critical():  # a Ctrl-C here waits until the trial is recorded
            staging = io.staging_dir(weights)
            setup.method.save(staging)
            io.replace_dir(staging, weights)
            record.weights = io.TRIAL_WEIGHTS
            self.finish_slot(slot, TrialState.COMPLETE)
        return result.metrics

    # ---- recording the served trials --------------------------------------------------------------
    def finish_slot(
        self,
        slot: TrialSlot,
        state: TrialState,
        reason: str | None = None,
        fate: Fate = Fate.ERROR,
        error_type: str | None = None,
    ) -> None:
        """Record one slot with what the run produced up to its step, then close it."""
        record = self.records[slot.number]
        record.history = [h for h in self.history if h["step"] <= slot.step]
        record.evals = [e for e in self.evals if e["step"] <= slot.step]
        record.train_seconds = round(time.perf_counter() - self.started, 3)
        if self.setup is not None:
            for key, value in self.setup.memory_record().items():
                setattr(record, key, value)
        link = self.links[slot.number]
        if state == TrialState.COMPLETE:
            self.recorder.complete(slot, record, link)
        else:
            self.recorder.fail(slot, record, link, reason or "unknown", state, fate, error_type)
        self.recorder.track(slot, record, {"eval/grid": [g for g in self.grids if g[0] <= slot.step]})
        enforce_keep_best_k(self.cfg, self.paths, self.recorder.handle)
        self.open_slots.remove(slot)
        self.say(trial_line(slot, record))  # as each milestone is recorded, not when the whole run ends

    def stop_open(
        self, state: TrialState, reason: str, fate: Fate = Fate.ERROR, error_type: str | None = None
    ) -> None:
        for slot in list(self.open_slots):
            self.finish_slot(slot, state, reason, fate, error_type)

    def fail_open(self, reason: str, fate: Fate = Fate.ERROR, error_type: str | None = None) -> None:
        self.stop_open(TrialState.FAIL, reason, fate, error_type)


def paired_prune_reason(cfg: Config, paths: io.StudyPaths, trial: int) -> str | None:
    """``sweep.pruner=wilcoxon``: why this run should stop after ``trial``'s evaluation, or None.

    Every trial is evaluated on the same units, so the evaluation just recorded is compared, unit by unit,
    with the best trial recorded so far (the study's own best-trial rule), one-sided paired Wilcoxon on the
    first objective: the run stops when it is significantly worse (p < ``sweep.pruner_alpha``). Optuna's
    WilcoxonPruner applies the same test to instances reported inside one trial; here the instances are the
    evaluation units and the reference is another trial, which Optuna's pruners cannot see.
    """
    from sdsweep.evaluation.units import lpips_key_of, metric_for, paired_frame, read_units
    from sdsweep.results.table import best_trial, build_results
    from sdsweep.uncertainty import significantly_worse

    objective = cfg.sweep.objectives[0]
    best = best_trial(build_results(paths), [(objective.metric, objective.direction)])
    if best is None or int(best["trial"]) == trial:
        return None
    mine, theirs = read_units(paths.trial(trial)), read_units(paths.trial(int(best["trial"])))
    if mine is None or theirs is None:
        return None
    definition = metric_for(objective.metric, mine, lpips_key_of(mine))
    if definition is None:
        return None  # a set statistic (FD, KD) has no units to pair
    pairs = paired_frame(definition.values(mine), definition.values(theirs))
    alpha = cfg.sweep.pruner_alpha
    if not significantly_worse(pairs["value_a"], pairs["value_b"], objective.direction, alpha=alpha):
        return None
    difference = float((pairs["value_a"] - pairs["value_b"]).mean())
    return (
        f"paired Wilcoxon: {objective.metric} worse than trial {int(best['trial'])} on {len(pairs)} shared "
        f"units (mean difference {difference:+.3g}, p < {alpha:g})"
    )


def trial_line(slot: TrialSlot, record: TrialRecord) -> str:
    """``  trial 3 [lr=1e-04 steps=40]: COMPLETE clip_score=54.2, val_loss=0.13`` (and the reason, if any)."""
    shown = ", ".join(
        f"{k.removeprefix('eval/')}={v:.4g}"
        for k, v in record.metrics.items()
        if k.count("/") == 1 and not is_internal(k) and isinstance(v, (int, float))
    )
    return (
        f"  trial {slot.number} [{short_params(slot.params)}]: {record.state.value}"
        + (f" {shown}" if shown else "")
        + (f" ({record.fail_reason})" if record.fail_reason else "")
    )


def execute_run(
    spec: RunSpec,
    caches: RunCaches | None = None,
    still_owned: Callable[[], None] | None = None,
    say: Callable[[str], None] | None = None,
    label: str = "driver",
    handle: StudyHandle | None = None,
) -> None:
    """Train once and record every trial slot of the run; failures are recorded, never raised (a stop
    signal and a take-over by another process are, since then nothing may be recorded). ``handle``: the
    claiming engine's study handle, so the run opens no second one."""
    RunExecutor(spec, caches or RunCaches(), still_owned, say, label, handle).run()
