"""Turn a sweep config into training runs: pure functions, no torch (Optuna is only asked, never imported).

A grid point is a dict {param key: value}. When the learning-rate schedule does not depend on the
total step count, every grid point that differs only in ``train.max_train_steps`` can be served by
one training run that is evaluated at each step count on its way to the largest one.
"""

from __future__ import annotations

import hashlib
import itertools
import json
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from sdsweep.config.schema import Config, ParamSpec
from sdsweep.metric_names import LR_KEY, STEP_KEY

if TYPE_CHECKING:
    import optuna

# Config groups that a sweep may switch (e.g. model: [sd15, sd21]); everything else is a dotted key.
GROUP_KEYS = ("model", "method", "data", "eval", "tracking")
# With these schedules the lr at step s is the same whatever the total, so a long run's prefix
# is exactly the short run.
STEP_INDEPENDENT_SCHEDULES = ("constant", "constant_with_warmup")


def canonical(value: Any) -> Any:
    """Values compare equal across JSON/SQLite round trips (400 vs 400.0, 1e-05 vs 1e-5)."""
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, (int, float)):
        as_float = float(value)
        return int(as_float) if as_float.is_integer() else float(f"{as_float:.12g}")
    return value


def point_key(point: dict[str, Any]) -> str:
    return json.dumps({k: canonical(v) for k, v in sorted(point.items())}, sort_keys=True)


def grid_points(params: dict[str, ParamSpec]) -> list[dict[str, Any]]:
    keys = sorted(params)
    choices = [list(params[k].choices or []) for k in keys]
    return [dict(zip(keys, combo)) for combo in itertools.product(*choices)]


def param_override(key: str, value: Any) -> str:
    """A Hydra override for one parameter; group keys select a config file (``model=sd21``)."""
    if key in GROUP_KEYS:
        return f"{key}={value}"
    return f"{key}={json.dumps(canonical(value))}"


def overrides_for(point: dict[str, Any]) -> list[str]:
    # Group selections first: a later dotted override must not be reset by the group's file.
    ordered = sorted(point, key=lambda k: (k not in GROUP_KEYS, k))
    return [param_override(k, point[k]) for k in ordered]


def schedule_of(point: dict[str, Any], cfg: Config) -> str:
    return str(point.get("train.lr_scheduler", cfg.train.lr_scheduler))


def can_share_milestones(point: dict[str, Any], cfg: Config) -> bool:
    return STEP_KEY in point and schedule_of(point, cfg) in STEP_INDEPENDENT_SCHEDULES


@dataclass
class RunPlan:
    """One training run and the grid points (trials) it evaluates."""

    base: dict[str, Any]  # the run's parameters without the step count
    points: list[dict[str, Any]]  # one per milestone, sorted by steps
    shared: bool = False
    key: str = field(default="")

    def __post_init__(self) -> None:
        if not self.key:
            self.key = hashlib.sha1(point_key(self.base).encode()).hexdigest()[:10]

    @property
    def milestones(self) -> list[int]:
        return [int(p[STEP_KEY]) for p in self.points] if self.shared else []


def plan_runs(points: list[dict[str, Any]], cfg: Config, share_milestones: bool) -> list[RunPlan]:
    """Group pending grid points into runs, keeping the grid's order for the run sequence."""
    runs: dict[str, RunPlan] = {}
    singles: list[RunPlan] = []
    for point in points:
        if share_milestones and can_share_milestones(point, cfg):
            base = {k: v for k, v in point.items() if k != STEP_KEY}
            key = point_key(base)
            if key not in runs:
                runs[key] = RunPlan(base=base, points=[], shared=True)
            runs[key].points.append(point)
        else:
            singles.append(RunPlan(base=dict(point), points=[point], shared=False))
    for run in runs.values():
        run.points.sort(key=lambda p: int(p[STEP_KEY]))
    return list(runs.values()) + singles


def short_params(point: dict[str, Any]) -> str:
    """``lr=1e-04 steps=400`` for run names and logs."""
    names = {LR_KEY: "lr", STEP_KEY: "steps"}
    parts = []
    for key in sorted(point, key=lambda k: (k not in names, k)):
        value = point[key]
        label = names.get(key, key.split(".")[-1])
        parts.append(
            f"{label}={value:.0e}" if key == LR_KEY and isinstance(value, float) else f"{label}={value}"
        )
    return " ".join(parts)


def suggest(trial: optuna.Trial, key: str, spec: ParamSpec) -> Any:
    """Ask an Optuna trial (search samplers) for a value of one parameter, as its ParamSpec describes it."""
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


# Keys that place or log a run but do not change what it trains.
NOT_PARAMETERS = ("hydra", "paths.", "tracking.", "study", "sweep.", "device")


def command_line_values(overrides: list[str]) -> dict[str, Any]:
    """``a.b=value`` settings from the command line as parameters (group choices like ``model=sd15`` too)."""
    import yaml

    values: dict[str, Any] = {}
    for override in overrides:
        key, sep, raw = override.lstrip("+").partition("=")
        if not sep or override.startswith("~") or key.startswith(NOT_PARAMETERS) or key == "experiment":
            continue
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError:
            value = raw
        if isinstance(value, (int, float, str, bool)):
            values[key] = value
    return values
