"""Weights & Biases logging: one run per finished trial and one run per study, grouped by study.

Trials are recorded *after the fact* from their ``TrialRecord`` (history, milestone evaluations,
images), one W&B run at a time: a milestone-sharing training run serves several trials, and logging
each trial afterwards gives every trial its own clean run without concurrent W&B runs.

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

from sdsweep.config import Config, flatten
from sdsweep.plan import short_params

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


def strip_secrets(values: dict[str, Any]) -> dict[str, Any]:
    """A copy without secret-looking keys, recursing into nested dicts."""
    clean: dict[str, Any] = {}
    for key, value in values.items():
        if is_secret_key(str(key)):
            continue
        clean[key] = strip_secrets(value) if isinstance(value, dict) else value
    return clean


def enabled(cfg: Config) -> bool:
    return cfg.tracking.backend == "wandb" and cfg.tracking.mode != "disabled"


def run_name(trial_number: int, params: dict[str, Any]) -> str:
    """``t003 lr=1e-04 steps=20``: sortable in the W&B run list, readable at a glance."""
    described = short_params(params)
    return f"t{trial_number:03d} {described}".rstrip()


def trial_config(cfg: Config, study: str, trial_number: int, params: dict[str, Any]) -> dict[str, Any]:
    """The run config: the whole flattened trial config plus the swept params (which win), secrets stripped."""
    values = flatten(cfg)
    values.update(params)
    values.update({"study": study, "trial": trial_number})
    return strip_secrets(values)


def _finite(value: Any) -> Any:
    # W&B stores NaN as a string in history; a missing point is clearer on charts.
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def history_by_step(
    record: dict[str, Any], images: dict[str, list[tuple[int, Any]]] | None = None
) -> list[tuple[int, dict[str, Any]]]:
    """Merge training history, milestone evaluations and images into one row per step, in step order.

    W&B rejects a step lower than one already logged, so everything logged at the same step must go
    in one ``log`` call. Image values stay whatever the caller passed (converted when logging).
    """
    rows: dict[int, dict[str, Any]] = {}
    for entry in record.get("history") or []:
        step = int(entry["step"])
        rows.setdefault(step, {}).update({k: _finite(v) for k, v in entry.items() if k != "step"})
    for entry in record.get("evals") or []:
        step = int(entry["step"])
        scalars = {k: _finite(v) for k, v in entry.items() if k != "step" and isinstance(v, (int, float))}
        rows.setdefault(step, {}).update(scalars)
    for key, series in (images or {}).items():
        for step, image in series:
            if image is not None:
                rows.setdefault(int(step), {})[key] = image
    return sorted(rows.items())


def trial_summary(record: dict[str, Any]) -> dict[str, Any]:
    """Final metrics and the trial's outcome, overriding W&B's "last logged value" summary."""
    summary: dict[str, Any] = {k: _finite(v) for k, v in (record.get("metrics") or {}).items()}
    summary.update({k: _finite(v) for k, v in (record.get("delta") or {}).items()})
    summary["state"] = record.get("state")
    summary["fail_reason"] = record.get("fail_reason")
    for key in ("trial", "objective", "feasible", "step", "train_seconds", "eval_seconds"):
        if key in record:
            summary[key] = _finite(record[key])
    return summary


@contextmanager
def _wandb_run(cfg: Config, run_dir: Path, **init_kwargs: Any) -> Iterator[Any]:
    """An open W&B run that is always finished; the exit code marks runs that failed mid-logging."""
    import wandb

    target = Path(cfg.tracking.dir) if cfg.tracking.dir else Path(run_dir)
    target.mkdir(parents=True, exist_ok=True)
    settings = wandb.Settings(
        silent=True,
        console="off",  # the sweep's own log is the record of stdout
        disable_git=True,
        save_code=False,
        x_disable_stats=True,  # system metrics are noise for a run logged after the fact
        x_save_requirements=False,
        disable_job_creation=True,
    )
    run = wandb.init(
        project=cfg.tracking.project,
        entity=cfg.tracking.entity,
        mode=cfg.tracking.mode,
        dir=str(target),
        reinit="create_new",
        settings=settings,
        **init_kwargs,
    )
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
    record: dict[str, Any],
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
        tags = [
            str(t) for t in [record.get("model") or cfg.model.name, record.get("method") or cfg.method.name]
        ]
        with _wandb_run(
            cfg,
            run_dir,
            group=study,
            job_type=str(record.get("method") or cfg.method.name),
            tags=list(dict.fromkeys(tags + list(cfg.tracking.tags))),
            name=name,
            config=trial_config(cfg, study, trial_number, params),
        ) as run:
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
    columns = [str(c) for c in results.columns]
    rows = [[_table_value(v) for v in row] for row in results.itertuples(index=False, name=None)]
    return columns, rows


def best_trial_summary(cfg: Config, results: Any) -> dict[str, Any]:
    """``best/*`` summary keys for the study run (empty when no trial completed)."""
    from sdsweep.results import best_trial

    direction = cfg.sweep.objectives[0].direction if cfg.sweep and cfg.sweep.objectives else "maximize"
    best = best_trial(results, direction, feasible_only=False)
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
        config = strip_secrets({**flatten(cfg), "study": study})
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
