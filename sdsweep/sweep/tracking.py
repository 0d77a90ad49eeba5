"""Weights & Biases logging: one run per trial, streamed while it trains, and one run per study.

Runs are grouped so the dashboard compares like with like: ``group`` = the study, ``job_type`` = the
method, tags and config keys ``model.name`` / ``method.name``; group by ``model.name`` to compare the
methods within a model, or filter by a method's job type to compare models within that method.

Live trial runs (``LiveTrialRuns``): every trial of a training run gets its own W&B run, opened when
training starts. A milestone-sharing run (one training run evaluated at 200/400/800 steps) serves
several trials; each trial's W&B run receives the shared training curve up to its own step count,
its evaluations, and is finished at its milestone. That is exactly what an independent run to that
step count would have logged (with a step-independent schedule the long run's prefix *is* the short
run), so every grid point stays one W&B run (one line on parallel coordinates) and nothing is
replayed after the fact. Trials that never reached a training step (a crash while loading) are
recorded after the fact from their record by ``record_trial``.

What is logged is computed in sdsweep/sweep/tracking_values.py; this module only talks to W&B.
This is the only module that imports wandb, and it imports it inside functions so that a sweep with
``tracking=none`` never pays for the import. Tracking must never fail a trial: every W&B error is
caught, reported as a warning, and turned into ``None``.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sdsweep.config.schema import Config
from sdsweep.study.record import TrialRecord, TrialState, as_record
from sdsweep.sweep.tracking_values import (
    best_trial_summary,
    finite,
    history_by_step,
    results_table_data,
    run_name,
    study_config,
    trial_config,
    trial_summary,
)


def enabled(cfg: Config) -> bool:
    return cfg.tracking.backend == "wandb" and cfg.tracking.mode != "disabled"


def _open_run(cfg: Config, run_dir: Path, **init_kwargs: Any) -> Any:
    import wandb

    target = Path(cfg.tracking.dir) if cfg.tracking.dir else Path(run_dir)
    target.mkdir(parents=True, exist_ok=True)
    settings = wandb.Settings(
        silent=True,
        console="off",  # the sweep's own log is the record of stdout
        disable_git=True,
        save_code=False,
        x_disable_stats=True,  # system metrics: the sweep records its own timings
        x_save_requirements=False,
        disable_job_creation=True,
    )
    if "x_transaction_log_flush_interval" in type(settings).model_fields:
        # Offline runs reach their .wandb file at this interval while they train (wandb >= 0.23).
        settings.x_transaction_log_flush_interval = float(cfg.tracking.flush_seconds)
    return wandb.init(
        project=cfg.tracking.project,
        entity=cfg.tracking.entity,
        mode=cfg.tracking.mode,
        dir=str(target),
        reinit="create_new",
        settings=settings,
        **init_kwargs,
    )


@contextmanager
def _wandb_run(cfg: Config, run_dir: Path, **init_kwargs: Any) -> Iterator[Any]:
    """An open W&B run that is always finished; the exit code marks runs that failed mid-logging."""
    run = _open_run(cfg, run_dir, **init_kwargs)
    exit_code = 1
    try:
        yield run
        exit_code = 0
    finally:
        run.finish(exit_code=exit_code)


def _warn(what: str, error: BaseException) -> None:
    warnings.warn(
        f"W&B tracking skipped for {what}: {type(error).__name__}: {error}", RuntimeWarning, stacklevel=3
    )


def _to_wandb_image(image: Any, caption: str) -> Any:
    import wandb

    return image if isinstance(image, wandb.Image) else wandb.Image(image, caption=caption)


def record_trial(
    cfg: Config,
    study: str,
    trial_number: int,
    params: dict[str, Any],
    record: TrialRecord | dict[str, Any],
    images: dict[str, list[tuple[int, Any]]],
    run_dir: Path,
) -> str | None:
    """Log one finished trial (COMPLETE, PRUNED or FAIL) as its own W&B run; returns the run id.

    ``images`` maps a media key (``eval/grid``) to ``[(step, PIL image)]``. Returns None when tracking
    is off or W&B fails (a warning says why); it never raises.
    """
    if not enabled(cfg):
        return None
    name = run_name(trial_number, params)
    try:
        with _wandb_run(cfg, run_dir, **trial_init(cfg, study, trial_number, params)) as run:
            for step, row in history_by_step(record, images if cfg.tracking.log_images else None):
                logged = {
                    k: (_to_wandb_image(v, f"{name} step {step}") if k in images else v)
                    for k, v in row.items()
                }
                run.log(logged, step=step)
            run.summary.update(trial_summary(record))
            return run.id
    except Exception as error:  # tracking must never fail a trial
        _warn(f"trial {trial_number}", error)
        return None


def trial_init(cfg: Config, study: str, trial_number: int, params: dict[str, Any]) -> dict[str, Any]:
    """``wandb.init`` arguments of a trial run: grouped by study, job type = method, model/method tags."""
    model, method = str(cfg.model.name), str(cfg.method.name)
    return {
        "group": study,
        "job_type": method,
        "tags": list(dict.fromkeys([model, method] + [str(t) for t in cfg.tracking.tags])),
        "name": run_name(trial_number, params),
        "config": trial_config(cfg, study, trial_number, params),
    }


class LiveTrialRuns:
    """The W&B runs of one training run's trials, open while it trains (see the module docstring).

    ``slots`` are objects with ``number``, ``step`` and ``params`` (the trial slots of the run). Runs
    open on the first logged step. Every method swallows W&B errors with a warning: tracking never
    fails a trial.
    """

    def __init__(self, cfg: Config, study: str, slots: list[Any], run_dir: Path):
        self.cfg, self.study, self.run_dir = cfg, study, Path(run_dir)
        self.slots = {s.number: s for s in slots}
        self.runs: dict[int, Any] = {}
        self.enabled = enabled(cfg)
        self._opened = False

    def _open(self) -> None:
        self._opened = True
        for number, slot in sorted(self.slots.items()):
            try:
                self.runs[number] = _open_run(
                    self.cfg, self.run_dir, **trial_init(self.cfg, self.study, number, slot.params)
                )
            except Exception as error:
                _warn(f"trial {number}", error)

    def _log(self, step: int, values: dict[str, Any], image: Any = None) -> None:
        if not self.enabled:
            return
        if not self._opened:
            self._open()
        for number, run in list(self.runs.items()):
            if self.slots[number].step < step:
                continue  # this trial ended before the step: its run is (being) finished
            try:
                if image is not None:  # a wandb.Image belongs to one run: one object per run
                    values = {**values, "eval/grid": _to_wandb_image(image, f"{run.name} step {step}")}
                run.log(values, step=step)
            except Exception as error:
                _warn(f"trial {number}", error)
                self.runs.pop(number, None)

    def log_step(self, step: int, values: dict[str, float]) -> None:
        """Training scalars at ``step`` (train/loss, train/lr, ...) into every trial still training."""
        self._log(step, {k: finite(v) for k, v in values.items()})

    def log_eval(self, step: int, metrics: dict[str, Any], grid: Any = None) -> None:
        """A milestone evaluation into every trial that reaches ``step``."""
        values = {k: finite(v) for k, v in metrics.items() if isinstance(v, (int, float))}
        self._log(step, values, grid if self.cfg.tracking.log_images else None)

    def finish(self, number: int, record: TrialRecord | dict[str, Any]) -> str | None:
        """Write the trial's summary and finish its run; None when it has no live run."""
        run = self.runs.pop(number, None)
        if run is None:
            return None
        try:
            run.summary.update(trial_summary(record))
            run.finish(exit_code=1 if as_record(record).state == TrialState.FAIL else 0)
            return run.id
        except Exception as error:
            _warn(f"trial {number}", error)
            return None

    def is_live(self, number: int) -> bool:
        return number in self.runs

    def close(self) -> None:
        """Finish any run left open (a crash between steps); their trials are marked by the caller."""
        for number in list(self.runs):
            self.finish(number, TrialRecord(number, TrialState.FAIL, fail_reason="training stopped"))


def record_study(cfg: Config, study: str, results: Any, plots: dict[str, Path], run_dir: Path) -> str | None:
    """Log the study as one run (job_type ``study``, same group as its trials); returns the run id.

    Logs ``trials`` (a ``wandb.Table`` of ``results`` — every trial plus the baseline row), each plot in
    ``plots`` as ``plots/<name>``, and a summary with the best trial (``best/trial``, ``best/objective``, ...).

    Parallel coordinates on the dashboard: open the project, filter the runs by this group, add a
    panel "Parallel coordinates" and choose the columns ``method.learning_rate``,
    ``train.max_train_steps``, ``method.name``, ``model.name`` (run config) and ``eval/clip_score``,
    ``eval/fid``, ``eval/appropriate_rate`` (run summary). The same panel can be built from the
    ``trials`` table of this run (Add panel -> Parallel coordinates -> table ``trials``).
    """
    if not enabled(cfg):
        return None
    try:
        import wandb

        columns, rows = results_table_data(results)
        config = study_config(cfg, study)
        with _wandb_run(
            cfg,
            run_dir,
            group=study,
            job_type="study",
            tags=list(cfg.tracking.tags),
            name=f"{study} (study)",
            config=config,
        ) as run:
            payload: dict[str, Any] = {
                "trials": wandb.Table(columns=columns, data=rows, allow_mixed_types=True)
            }
            if cfg.tracking.log_images:
                for name, path in sorted(plots.items()):
                    if Path(path).is_file():
                        payload[f"plots/{name}"] = wandb.Image(str(path), caption=name)
            run.log(payload, step=0)
            run.summary.update(best_trial_summary(cfg, results))
            run.summary["num_trials"] = (
                int((results["trial"] >= 0).sum()) if "trial" in results else len(rows)
            )
            return run.id
    except Exception as error:  # the study's own files are the record; W&B is a view of them
        _warn(f"study {study}", error)
        return None
