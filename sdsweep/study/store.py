"""The Optuna side of a study: storage, samplers, pruners, and telling results.

Both the sweep driver and the trial worker (another process) open the same study through here, so
results reach the storage even when the driver is killed.
"""

from __future__ import annotations

import hashlib
import math
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

from sdsweep.config.schema import Config
from sdsweep.study.trial_tags import VIOLATIONS, Fate, TrialTags, ending

# The user attributes a trial carries are named, read and written in one place: study/trial_tags.py.


def storage_url(cfg: Config, study_root: Path) -> str:
    if cfg.sweep.storage:
        return cfg.sweep.storage
    return f"sqlite:///{(study_root / 'study.db').resolve()}"


def journal_path(url: str) -> str | None:
    """``journal:///abs/study.log`` (or a bare path ending in .log/.journal) names a JournalStorage file."""
    if url.startswith("journal:"):
        return url.removeprefix("journal:").removeprefix("//")
    if "://" not in url and url.endswith((".log", ".journal")):
        return url
    return None


def open_storage(url: str):
    path = journal_path(url)
    if path is not None:
        from optuna.storages import JournalStorage
        from optuna.storages.journal import JournalFileBackend

        Path(path).parent.mkdir(parents=True, exist_ok=True)
        return JournalStorage(JournalFileBackend(path))
    if url.startswith("sqlite:///"):
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    # SQLite under concurrent writers (driver + worker) needs a busy timeout.
    engine_kwargs = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {}
    return _create_rdb_storage(url, engine_kwargs)


def _create_rdb_storage(url: str, engine_kwargs: dict[str, Any], attempts: int = 8):
    """RDBStorage, retried: processes that start together on a new database race to create its tables.

    SQLite answers the loser with a UNIQUE violation on alembic_version, PostgreSQL with one on pg_type;
    by the next attempt the winner has created the schema and the loser just opens it.
    """
    import random
    import time

    from sqlalchemy.exc import IntegrityError, OperationalError, ProgrammingError

    for attempt in range(attempts):
        try:
            return optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs)
        except (IntegrityError, OperationalError, ProgrammingError):
            if attempt == attempts - 1:
                raise
            time.sleep(0.2 + random.random() * 0.5 * (attempt + 1))
    raise AssertionError("unreachable")


def make_sampler(cfg: Config, seed: int | None = None):
    """The study's sampler, seeded with ``seed`` (default: sweep.seed; see ``trial_seed`` for draws)."""
    sweep = cfg.sweep
    assert sweep is not None
    seed = sweep.seed if seed is None else seed
    if sweep.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    # GP and TPE read each trial's constraints (Trial.set_constraint) themselves; CMA-ES cannot, so a
    # constrained CMA-ES study is refused at validation. Few startup trials: a sweep has few trials at all.
    startup = min(10, max(2, (sweep.n_trials or 10) // 4))
    if sweep.sampler == "gp":
        return optuna.samplers.GPSampler(seed=seed, n_startup_trials=startup)
    if sweep.sampler == "cmaes":
        return optuna.samplers.CmaEsSampler(seed=seed, n_startup_trials=startup)
    # Grid studies enqueue every point, so the sampler never samples. Feasibility reaches TPE through
    # Trial.set_constraint (Optuna 5), recorded when the trial is told.
    return optuna.samplers.TPESampler(seed=seed, multivariate=True)


def trial_seed(sweep_seed: int | None, number: int) -> int | None:
    """The seed of the sampler that draws trial ``number`` of a search study: sweep.seed and the trial's number.

    A sampler seeded once per process replays its draws in every process: a study resumed after a kill
    drew its first startup point again (a repeated learning rate), and two workers of a pool drew the same
    one. Trial numbers are unique in a study, and the number is what the storage held before the trial,
    so a draw depends on the sweep's seed and the study's history only, not on which process makes it.
    None (an unseeded sampler) stays None.
    """
    if sweep_seed is None:
        return None
    digest = hashlib.sha256(f"{sweep_seed}:{number}".encode()).digest()
    return int.from_bytes(digest[:4], "big")


def make_pruner(cfg: Config):
    name = cfg.sweep.pruner
    if name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=0)
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=cfg.train.max_train_steps)
    return optuna.pruners.NopPruner()


def directions(cfg: Config) -> list[str]:
    return [o.direction for o in cfg.sweep.objectives]


class StudyHandle:
    """An Optuna study together with the storage object we built for it.

    Holding the storage ourselves gives its public methods (trial ids, attributes, state) without
    reaching into ``study._storage``.
    """

    def __init__(self, cfg: Config, url: str, study_name: str):
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        self.url = url
        self.storage = open_storage(url)
        self.study = optuna.create_study(
            study_name=study_name,
            storage=self.storage,
            load_if_exists=True,
            directions=directions(cfg),
            sampler=make_sampler(cfg),
            pruner=make_pruner(cfg),
        )
        self.study_id = self.storage.get_study_id_from_name(study_name)
        names = [o.metric for o in cfg.sweep.objectives]
        if self.study.metric_names is None and names:
            import warnings

            # "experimental" since Optuna 3.2, and still the way to name objectives.
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                self.study.set_metric_names(names)  # optuna-dashboard shows "eval/clip_score", not "values_0"

    def trial_id(self, number: int) -> int:
        return self.storage.get_trial_id_from_study_id_trial_number(self.study_id, number)

    def trials(self, states=None) -> list[optuna.trial.FrozenTrial]:
        return self.study.get_trials(deepcopy=False, states=states)

    def get_trial(self, number: int) -> optuna.trial.FrozenTrial:
        return self.storage.get_trial(self.trial_id(number))

    def set_attr(self, number: int, key: str, value: Any) -> bool:
        """Set a user attribute on a trial; False when the trial has already finished."""
        try:
            self.storage.set_trial_user_attr(self.trial_id(number), key, value)
        except (optuna.exceptions.UpdateFinishedTrialError, RuntimeError):
            return False
        return True

    def set_tags(self, number: int, tags: TrialTags) -> bool:
        """Write a trial's tags (the fields that are set); False when the trial has already finished."""
        return all(self.set_attr(number, key, value) for key, value in tags.attrs().items())


def open_study(cfg: Config, url: str, study_name: str) -> optuna.Study:
    return StudyHandle(cfg, url, study_name).study


def objective_values(cfg: Config, metrics: dict[str, Any]) -> list[float] | str:
    """The values to tell Optuna, or the reason they cannot be computed."""
    values = []
    for objective in cfg.sweep.objectives:
        value = metrics.get(objective.metric)
        if value is None or not math.isfinite(float(value)):
            return f"objective {objective.metric} is missing or not finite"
        values.append(float(value))
    return values


class TrialLink:
    """Report and tell one Optuna trial from whichever process trains it."""

    def __init__(self, handle: StudyHandle, number: int):
        self.handle = handle
        self.study = handle.study
        self.number = number
        self.trial = optuna.trial.Trial(handle.study, handle.trial_id(number))

    def state(self) -> TrialState:
        return self.handle.get_trial(self.number).state

    def set_attr(self, key: str, value: Any) -> None:
        self.trial.set_user_attr(key, value)

    def set_tags(self, tags: TrialTags) -> None:
        for key, value in tags.attrs().items():
            self.trial.set_user_attr(key, value)

    def report(self, value: float, step: int) -> None:
        if len(self.study.directions) == 1 and math.isfinite(value):
            self.trial.report(value, step)

    def should_prune(self) -> bool:
        return len(self.study.directions) == 1 and self.trial.should_prune()

    def complete(self, values: list[float], violations: dict[str, float]) -> None:
        self.set_attr(VIOLATIONS, violations)
        for name, violation in violations.items():
            self.trial.set_constraint(name, float(violation))  # <= 0 means satisfied, for Optuna
            # ... and a line a person can read in the dashboard.
            self.set_attr(
                f"constraint: {name}", "satisfied" if violation <= 0 else f"violated by {violation:.4g}"
            )
        self.study.tell(self.number, values=values if len(values) > 1 else values[0])

    def fail(self, reason: str, fate: Fate = Fate.ERROR, error_type: str | None = None) -> None:
        self.set_tags(ending(fate, reason, error_type=error_type))
        self.study.tell(self.number, state=TrialState.FAIL)

    def prune(self, reason: str) -> None:
        self.set_tags(ending(Fate.PRUNED, reason))
        self.study.tell(self.number, state=TrialState.PRUNED)
