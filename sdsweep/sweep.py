"""The sweep driver: one Optuna study per ``study`` name, one training run at a time, resumable.

Re-running the same command continues the study: trials a killed process left RUNNING are failed
and their grid points queued again, finished grid points are never re-run, and a finished grid is
reported as finished instead of being sampled again.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

from sdsweep import io
from sdsweep.compose import user_overrides
from sdsweep.config import Config, ParamSpec, SweepConfig
from sdsweep.plan import (
    STEP_KEY,
    RunPlan,
    canonical,
    grid_points,
    overrides_for,
    plan_runs,
    point_key,
    short_params,
)
from sdsweep.progress import Progress
from sdsweep.results import best_trial, write_results
from sdsweep.study_store import (
    FAIL_REASON,
    GRID_POINT,
    INTERRUPTED,
    SUPERSEDED,
    open_study,
    pid_alive,
    storage_url,
)
from sdsweep.trial import RunSpec, TrialSlot, compose_config, execute_baseline, execute_run

DRIVER = "driver"  # user attr: host:pid of the process that owns a RUNNING trial


@dataclass
class SweepOutcome:
    study_dir: Path
    results_csv: Path
    states: dict[str, int] = field(default_factory=dict)
    runs_launched: int = 0
    trials_launched: int = 0
    finished: bool = False
    best: dict[str, Any] | None = None


def log(message: str) -> None:
    print(f"[sdsweep] {message}", flush=True)


class SweepDriver:
    def __init__(self, overrides: list[str]):
        self.overrides = user_overrides(list(overrides))
        self.cfg: Config = compose_config(self.overrides)
        self.sweep: SweepConfig = self.cfg.sweep
        self.paths = io.StudyPaths.of(self.cfg.paths.root, self.cfg.study)
        self.paths.root.mkdir(parents=True, exist_ok=True)
        self.storage = storage_url(self.cfg, self.paths.root)
        self.study = open_study(self.cfg, self.storage, self.cfg.study)
        self.me = f"{socket.gethostname()}:{os.getpid()}"
        self.outcome = SweepOutcome(self.paths.root, self.paths.results_csv)
        # A single run is identified by its whole config, so changing any value runs again.
        self.single_key = None
        if self.sweep.name == "single":
            import hashlib

            from sdsweep.config import to_yaml

            self.single_key = "single:" + hashlib.sha1(to_yaml(self.cfg).encode()).hexdigest()[:12]

    def key_of(self, point: dict[str, Any]) -> str:
        return self.single_key if self.single_key and not point else point_key(point)

    # ---- resume -------------------------------------------------------------------------------
    def recover_interrupted(self) -> int:
        """Fail trials whose owning process is gone, so their grid points are queued again."""
        host = socket.gethostname()
        recovered = 0
        for frozen in self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            owner = str(frozen.user_attrs.get(DRIVER, ""))
            owner_host, _, owner_pid = owner.partition(":")
            if owner_host == host and owner_pid.isdigit() and pid_alive(int(owner_pid)) and owner != self.me:
                continue  # another driver on this machine is still working on it
            # Attributes first: a finished trial can no longer be changed.
            self.study._storage.set_trial_user_attr(frozen._trial_id, INTERRUPTED, True)
            self.study._storage.set_trial_user_attr(frozen._trial_id, SUPERSEDED, True)
            self.study._storage.set_trial_user_attr(
                frozen._trial_id, FAIL_REASON, "interrupted: the sweep process was killed during this trial"
            )
            self.study.tell(frozen.number, state=TrialState.FAIL)
            recovered += 1
        for _waiting in self.study.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
            trial = self.study.ask()  # a queued point from a killed driver: retire it, it is re-planned
            trial.set_user_attr(SUPERSEDED, True)
            self.study.tell(trial.number, state=TrialState.FAIL)
        if recovered:
            log(f"resuming: {recovered} interrupted trial(s) marked FAIL and their grid points queued again")
        return recovered

    def superseded(self) -> set[int]:
        """Trials whose grid point was queued again; kept in storage, left out of results."""
        marked = {t.number for t in self.study.get_trials(deepcopy=False) if t.user_attrs.get(SUPERSEDED)}
        return marked | set(self.study.user_attrs.get(SUPERSEDED, []))

    def supersede(self, number: int) -> None:
        numbers = set(self.study.user_attrs.get(SUPERSEDED, []))
        if number not in numbers:
            self.study.set_user_attr(SUPERSEDED, sorted(numbers | {number}))

    def decided_points(self) -> dict[str, list[optuna.trial.FrozenTrial]]:
        """Grid points that already have an outcome that should stand."""
        decided: dict[str, list[optuna.trial.FrozenTrial]] = {}
        superseded = self.superseded()
        for frozen in self.study.get_trials(deepcopy=False):
            key = frozen.user_attrs.get(GRID_POINT) or point_key(frozen.params)
            if frozen.number in superseded:
                continue
            if frozen.state in (TrialState.COMPLETE, TrialState.PRUNED):
                decided.setdefault(key, []).append(frozen)
            elif frozen.state == TrialState.FAIL:
                if frozen.user_attrs.get(INTERRUPTED) or self.sweep.retry_failed:
                    self.supersede(frozen.number)
                else:
                    decided.setdefault(key, []).append(frozen)
        return decided

    # ---- trials ---------------------------------------------------------------------------------
    def new_slot(self, point: dict[str, Any], step: int) -> TrialSlot:
        self.study.enqueue_trial({k: canonical(v) for k, v in point.items()}, skip_if_exists=False)
        trial = self.study.ask()
        for key, spec in self.sweep.params.items():
            if key in point:
                choices = [canonical(c) for c in spec.choices] if spec.choices else [canonical(point[key])]
                trial.suggest_categorical(key, choices)
        trial.set_user_attr(GRID_POINT, self.key_of(point))
        trial.set_user_attr(DRIVER, self.me)
        return TrialSlot(number=trial.number, trial_id=trial._trial_id, step=step, params=point)

    def sampled_slot(self) -> TrialSlot:
        trial = self.study.ask()
        point: dict[str, Any] = {}
        for key, spec in sorted(self.sweep.params.items()):
            point[key] = suggest(trial, key, spec)
        method = point.get("method")
        if method in self.sweep.learning_rate_by_method:
            # A separate Optuna parameter per method: each keeps its own distribution.
            spec = self.sweep.learning_rate_by_method[method]
            point["method.learning_rate"] = suggest(trial, f"method.learning_rate[{method}]", spec)
        trial.set_user_attr(GRID_POINT, point_key(point))
        trial.set_user_attr(DRIVER, self.me)
        step = int(point.get(STEP_KEY, self.cfg.train.max_train_steps))
        return TrialSlot(number=trial.number, trial_id=trial._trial_id, step=step, params=point)

    def spec_for(self, run: RunPlan, slots: list[TrialSlot]) -> RunSpec:
        overrides = self.overrides + overrides_for(run.base if run.shared else run.points[0])
        if run.shared:
            overrides.append(f"{STEP_KEY}={max(s.step for s in slots)}")
        report_every = 0
        if self.sweep.pruner != "none" and not run.shared:
            report_every = max(1, max(s.step for s in slots) // 4)
        return RunSpec(
            kind="train",
            study=self.cfg.study,
            study_root=str(self.paths.root.resolve()),
            storage=self.storage,
            overrides=overrides,
            run_key=run.key,
            slots=slots,
            shared=run.shared,
            report_every=report_every,
        )

    def execute(self, spec: RunSpec) -> None:
        if self.sweep.isolation == "inprocess":
            (execute_baseline if spec.kind == "baseline" else execute_run)(spec)
            return
        self.paths.runs.mkdir(parents=True, exist_ok=True)
        name = "baseline" if spec.kind == "baseline" else f"{spec.run_key}-t{spec.slots[0].number:04d}"
        spec_path = io.atomic_write_text(self.paths.runs / f"{name}.json", spec.to_json())
        log_path = self.paths.runs / f"{name}.log"
        with open(log_path, "ab") as log_file:
            proc = subprocess.run(
                [sys.executable, "-m", "sdsweep.worker", str(spec_path)],
                stdout=log_file,
                stderr=subprocess.STDOUT,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )
        if proc.returncode != 0:
            tail = _tail(log_path)
            how = (
                f"killed by signal {-proc.returncode}"
                if proc.returncode < 0
                else f"exit code {proc.returncode}"
            )
            reason = f"worker process {how}; last output: {tail}"
            if spec.kind == "baseline":
                raise RuntimeError(f"The baseline evaluation failed ({reason}). Full log: {log_path}")
            self.fail_leftovers(spec.slots, reason)

    def fail_leftovers(self, slots: list[TrialSlot], reason: str) -> None:
        """Trials a crashed worker could not close: FAIL with the crash as the reason."""
        for slot in slots:
            frozen = self.study._storage.get_trial(slot.trial_id)
            if frozen.state == TrialState.RUNNING:
                self.study._storage.set_trial_user_attr(slot.trial_id, FAIL_REASON, reason[:2000])
                self.study.tell(slot.number, state=TrialState.FAIL)
                record = {
                    "trial": slot.number,
                    "state": "FAIL",
                    "params": slot.params,
                    "fail_reason": reason,
                    "step": slot.step,
                }
                io.atomic_write_json(self.paths.trial(slot.number) / io.TRIAL_METRICS, record)

    # ---- the loop ---------------------------------------------------------------------------------
    def write_study_json(self) -> None:
        cfg = self.cfg
        payload = {
            "study": cfg.study,
            "storage": self.storage,
            "sweep": self.sweep.name,
            "sampler": self.sweep.sampler,
            "params": sorted(self.sweep.params),
            "objectives": [{"metric": o.metric, "direction": o.direction} for o in self.sweep.objectives],
            "constraints": list(self.sweep.constraints),
            "model": cfg.model.name,
            "pretrained": cfg.model.path or cfg.model.pretrained,
            "method": cfg.method.name,
            "trigger_word": cfg.data.trigger_word,
            "placeholder_token": cfg.method.placeholder_token
            if cfg.method.name == "textual_inversion"
            else None,
            "eval": {
                "prompts": list(cfg.eval.prompts),
                "seeds": [cfg.eval.seed + i for i in range(cfg.eval.num_images_per_prompt)],
                "scheduler": cfg.eval.scheduler,
                "num_inference_steps": cfg.eval.num_inference_steps,
            },
            "overrides": self.overrides,
        }
        io.atomic_write_json(self.paths.study_json, payload)

    def ensure_baseline(self) -> None:
        if not self.cfg.eval.baseline:
            return
        if (io.read_json(self.paths.baseline / io.TRIAL_METRICS) or {}).get("state") == "COMPLETE":
            return
        log("evaluating the untuned base model once for this study (baseline)")
        spec = RunSpec(
            kind="baseline",
            study=self.cfg.study,
            study_root=str(self.paths.root.resolve()),
            storage=self.storage,
            overrides=self.overrides,
        )
        self.execute(spec)

    def run(self) -> SweepOutcome:
        started = time.monotonic()
        self.write_study_json()
        self.recover_interrupted()
        self.ensure_baseline()
        if self.sweep.sampler == "grid":
            self.run_grid(started)
        else:
            self.run_search(started)
        return self.finish()

    def out_of_time(self, started: float) -> bool:
        return self.sweep.timeout is not None and time.monotonic() - started > self.sweep.timeout

    def run_grid(self, started: float) -> None:
        points = grid_points(self.sweep.params) if self.sweep.params else [{}]
        decided = self.decided_points()
        pending = [p for p in points if self.key_of(p) not in decided]
        if self.sweep.n_trials is not None:
            pending = pending[: max(0, self.sweep.n_trials - len(decided))]
        if not pending:
            log(f"grid finished: all {len(points)} grid points have results; nothing to run")
            self.outcome.finished = True
            return
        runs = plan_runs(pending, self.cfg, self.sweep.share_milestones)
        log(
            f"study '{self.cfg.study}': {len(points)} grid points, {len(points) - len(pending)} already done, "
            f"{len(pending)} to run in {len(runs)} training run(s)"
        )
        overall = Progress(f"sweep {self.cfg.study}", len(pending), "points", lines_only=True)
        for index, run in enumerate(runs, 1):
            if self.out_of_time(started):
                log(f"sweep.timeout={self.sweep.timeout}s reached; re-run the same command to continue")
                return
            default_step = self.cfg.train.max_train_steps
            slots = [self.new_slot(p, int(p.get(STEP_KEY, default_step))) for p in run.points]
            what = (
                f"milestones {'/'.join(str(s.step) for s in slots)}"
                if run.shared
                else f"{slots[0].step} steps"
            )
            log(f"run {index}/{len(runs)}: {short_params(run.base) or 'config as given'} ({what})")
            self.execute(self.spec_for(run, slots))
            self.after_run(slots)
            overall.advance(len(slots), runs_left=len(runs) - index)
        self.outcome.finished = True

    def run_search(self, started: float) -> None:
        target = self.sweep.n_trials or 20
        while True:
            decided = self.decided_points()
            done = sum(len(v) for v in decided.values())
            if done >= target:
                log(f"search finished: {done}/{target} trials have results")
                self.outcome.finished = True
                return
            if self.out_of_time(started):
                log(f"sweep.timeout={self.sweep.timeout}s reached; re-run the same command to continue")
                return
            slot = self.sampled_slot()
            run = RunPlan(base=slot.params, points=[slot.params], shared=False)
            log(f"trial {slot.number} ({done + 1}/{target}): {short_params(slot.params)}")
            self.execute(self.spec_for(run, [slot]))
            self.after_run([slot])

    def after_run(self, slots: list[TrialSlot]) -> None:
        self.outcome.runs_launched += 1
        self.outcome.trials_launched += len(slots)
        for slot in slots:
            record = io.read_json(self.paths.trial(slot.number) / io.TRIAL_METRICS) or {}
            state = record.get("state", self.study._storage.get_trial(slot.trial_id).state.name)
            metrics = record.get("metrics") or {}
            shown = ", ".join(
                f"{k.removeprefix('eval/')}={v:.4g}"
                for k, v in metrics.items()
                if k.count("/") == 1 and isinstance(v, (int, float))
            )
            reason = record.get("fail_reason")
            log(
                f"  trial {slot.number} [{short_params(slot.params)}]: {state}"
                + (f" {shown}" if shown else "")
                + (f" ({reason})" if reason else "")
            )
        write_results(self.paths, self.study.get_trials(deepcopy=False), self.superseded())

    def finish(self) -> SweepOutcome:
        trials = self.study.get_trials(deepcopy=False)
        frame = write_results(self.paths, trials, self.superseded())
        states = frame["state"].value_counts().to_dict() if "state" in frame else {}
        self.outcome.states = {str(k): int(v) for k, v in states.items()}
        self.outcome.best = best_trial(frame, self.sweep.objectives[0].direction, feasible_only=False)
        self.track_study(frame)
        return self.outcome

    def track_study(self, frame) -> None:
        """Build the local report, then hand its plots and the trial table to the study-level W&B run."""
        import pandas as pd

        from sdsweep import report, tracking
        from sdsweep.results import baseline_row

        plots: dict[str, Path] = {}
        try:
            if self.sweep.build_report:
                html, _ = report.build_report(self.paths.root)
                plots = report.report_plots(self.paths.root)
                log(f"report: {html}")
        except Exception as error:  # the report is a convenience; results.csv is the record
            log(f"warning: report not built ({type(error).__name__}: {error})")
        base = baseline_row(self.paths)
        table = pd.concat([pd.DataFrame([base]), frame], ignore_index=True) if base is not None else frame
        try:
            tracking.record_study(self.cfg, self.cfg.study, table, plots, self.paths.wandb)
        except Exception as error:  # tracking never fails a sweep
            log(f"warning: study-level tracking failed ({error})")


def suggest(trial: optuna.Trial, key: str, spec: ParamSpec) -> Any:
    if spec.choices is not None:
        return trial.suggest_categorical(key, [canonical(c) for c in spec.choices])
    assert spec.low is not None and spec.high is not None
    if spec.type == "int":
        step = int(spec.step or 1)
        return trial.suggest_int(
            key, int(spec.low), int(spec.high), step=step if not spec.log else 1, log=spec.log
        )
    return trial.suggest_float(
        key, float(spec.low), float(spec.high), log=spec.log, step=None if spec.log else spec.step
    )


def _tail(path: Path, limit: int = 600) -> str:
    try:
        text = path.read_text(errors="replace").strip()
    except OSError:
        return "(no log)"
    lines = [line for line in text.splitlines() if line.strip()]
    return " | ".join(lines[-4:])[-limit:]


def run_sweep(overrides: list[str]) -> SweepOutcome:
    return SweepDriver(overrides).run()


def dumps_outcome(outcome: SweepOutcome) -> str:
    return json.dumps(
        {"study_dir": str(outcome.study_dir), "states": outcome.states, "best": outcome.best}, default=str
    )
