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

This is the only module that imports wandb, and it imports it inside functions so that a sweep with
``tracking=none`` never pays for the import. Tracking must never fail a trial: every W&B error is
caught, reported as a warning, and turned into ``None``.
"""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sdsweep.config.resolve import flatten
from sdsweep.config.schema import Config
from sdsweep.results.record import TrialRecord, TrialState, as_record
from sdsweep.sweep.plan import canonical, short_params

# Config keys whose last part is one of these words may hold credentials; they are never logged.
_SECRET_WORDS = {"key", "apikey", "token", "secret", "password", "passwd", "credentials"}
# Schema fields that name a vocabulary token of the model, not a credential.
_NOT_SECRET = {"method.placeholder_token", "method.initializer_token"}
_WORD = re.compile(r"[a-z0-9]+")


def is_secret_key(key: str) -> bool:
    """True for keys such as ``api_key``, ``WANDB_API_KEY``, ``hf.token``, ``db_password``."""
    if key in _NOT_SECRET:
        return False
    lowered = key.lower()
    words = set(_WORD.findall(lowered))
    return bool(words & _SECRET_WORDS) or any(w in lowered for w in ("apikey", "secret", "password", "token"))


_URL_PASSWORD = re.compile(r"(://[^/:@\s]+:)[^@\s]+@")


def strip_secrets(values: dict[str, Any]) -> dict[str, Any]:
    """A copy without secret-looking keys, recursing into nested dicts; URL passwords become ``***``."""
    clean: dict[str, Any] = {}
    for key, value in values.items():
        if is_secret_key(str(key)):
            continue
        if isinstance(value, str):
            value = _URL_PASSWORD.sub(r"\1***@", value)  # sweep.storage=postgresql://user:pw@host/db
        clean[key] = strip_secrets(value) if isinstance(value, dict) else value
    return clean


def enabled(cfg: Config) -> bool:
    return cfg.tracking.backend == "wandb" and cfg.tracking.mode != "disabled"


def run_name(trial_number: int, params: dict[str, Any]) -> str:
    """``t003 lr=1e-04 steps=20``: sortable in the W&B run list, readable at a glance."""
    described = short_params(params)
    return f"t{trial_number:03d} {described}".rstrip()


def trial_config(cfg: Config, study: str, trial_number: int, params: dict[str, Any]) -> dict[str, Any]:
    """The run config: the whole flattened trial config plus the swept params (which win), secrets stripped.

    Swept values go through ``canonical``: a step count read back as ``10.0`` (SQLite, JSON) is logged as 10.
    """
    values = flatten(cfg)
    values.update({k: canonical(v) for k, v in params.items()})
    values.update({"study": study, "trial": trial_number})
    return strip_secrets(values)


# Study-level config: what is the same for every trial. Hyperparameter sections (train.*, method.*
# and swept keys) are left out, so the study run is no fake point on parallel coordinates.
_STUDY_SECTIONS = ("study", "sweep.", "data.", "eval.", "model.", "method.name", "tracking.project")


def study_config(cfg: Config, study: str) -> dict[str, Any]:
    """The study run's config: study-level keys only, no per-trial hyperparameters."""
    swept = set(cfg.sweep.params) if cfg.sweep else set()
    swept_groups = {k for k in swept if "." not in k}  # model, method: a swept group has no single value

    def per_trial(key: str) -> bool:
        return key in swept or key.split(".", 1)[0] in swept_groups

    values = {
        k: v
        for k, v in flatten(cfg).items()
        if k.startswith(_STUDY_SECTIONS) and not k.startswith("sweep.params") and not per_trial(k)
    }
    values["study"] = study
    values["sweep.swept"] = sorted(swept)
    return strip_secrets(values)


def _finite(value: Any) -> Any:
    # W&B stores NaN as a string in history; a missing point is clearer on charts.
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def history_by_step(
    record: TrialRecord | dict[str, Any], images: dict[str, list[tuple[int, Any]]] | None = None
) -> list[tuple[int, dict[str, Any]]]:
    """Merge training history, milestone evaluations and images into one row per step, in step order.

    W&B rejects a step lower than one already logged, so everything logged at the same step must go
    in one ``log`` call. Image values stay whatever the caller passed (converted when logging).
    """
    record = as_record(record)
    rows: dict[int, dict[str, Any]] = {}
    for entry in record.history or []:
        step = int(entry["step"])
        rows.setdefault(step, {}).update({k: _finite(v) for k, v in entry.items() if k != "step"})
    for entry in record.evals or []:
        step = int(entry["step"])
        scalars = {k: _finite(v) for k, v in entry.items() if k != "step" and isinstance(v, (int, float))}
        rows.setdefault(step, {}).update(scalars)
    for key, series in (images or {}).items():
        for step, image in series:
            if image is not None:
                rows.setdefault(int(step), {})[key] = image
    return sorted(rows.items())


def trial_summary(record: TrialRecord | dict[str, Any]) -> dict[str, Any]:
    """Final metrics and the trial's outcome, overriding W&B's "last logged value" summary."""
    record = as_record(record)
    summary: dict[str, Any] = {k: _finite(v) for k, v in record.metrics.items()}
    summary.update({k: _finite(v) for k, v in record.delta.items()})
    summary["state"] = record.state.value
    summary["fail_reason"] = record.fail_reason
    for key in ("trial", "objective", "feasible", "step", "train_seconds", "eval_seconds"):
        if getattr(record, key) is not None:
            summary[key] = _finite(getattr(record, key))
    return summary


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
        self._log(step, {k: _finite(v) for k, v in values.items()})

    def log_eval(self, step: int, metrics: dict[str, Any], grid: Any = None) -> None:
        """A milestone evaluation into every trial that reaches ``step``."""
        values = {k: _finite(v) for k, v in metrics.items() if isinstance(v, (int, float))}
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


# Counts that pandas turns into floats when a row lacks them (the baseline has no trial number).
_INTEGER_COLUMN = re.compile(r"(^|[._/])(trial|step|steps|seed|\w+_steps)$")
# Columns that repeat a parameter column under a shorter name (results.csv keeps both for reading).
_DUPLICATE_COLUMNS = {"learning_rate": "method.learning_rate", "max_train_steps": "train.max_train_steps"}


def _table_value(value: Any) -> Any:
    if value is None:
        return None
    if hasattr(value, "item") and callable(value.item):  # numpy scalars
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def results_table_data(results: Any) -> tuple[list[str], list[list[Any]]]:
    """Columns and JSON-safe rows of the results DataFrame (NaN -> None, numpy -> Python)."""
    drop = [c for c, twin in _DUPLICATE_COLUMNS.items() if c in results.columns and twin in results.columns]
    results = results.drop(columns=drop)
    columns = [str(c) for c in results.columns]
    rows = [[_table_value(v) for v in row] for row in results.itertuples(index=False, name=None)]
    for index, column in enumerate(columns):
        if not _INTEGER_COLUMN.search(column):
            continue
        values = [row[index] for row in rows if row[index] is not None]
        if values and all(isinstance(v, (int, float)) and float(v).is_integer() for v in values):
            for row in rows:  # a NaN-holed int column comes back from pandas as floats: 10.0 -> 10
                if row[index] is not None and not isinstance(row[index], bool):
                    row[index] = int(row[index])
    return columns, rows


def best_trial_summary(cfg: Config, results: Any) -> dict[str, Any]:
    """``best/*`` summary keys for the study run (empty when no trial completed)."""
    from sdsweep.results.study_folder import best_trial

    objectives = cfg.sweep.objectives if cfg.sweep and cfg.sweep.objectives else "maximize"
    best = best_trial(results, objectives)  # the one rule: the CLI, the report and export use it
    if best is None:
        return {"best/trial": None}
    return {f"best/{k}": _table_value(v) for k, v in best.items() if _table_value(v) is not None}


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
