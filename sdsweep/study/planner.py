"""The grid planner: which grid points this process may still claim, grouped into training runs, in claim order.

Pure: the study's state comes in as the keys of decided and live points (``sweep.ledger`` reads them from
the storage), and nothing is read or written; no Optuna. The grid is planned again every time a process
looks for work, so what another process claimed or finished meanwhile is simply left out.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Any

from sdsweep.config.schema import Config
from sdsweep.study.plan import STEP_KEY, RunPlan, grid_points, plan_runs


@dataclass(frozen=True)
class GridPlan:
    points: int  # grid points of the study (within n_trials or not)
    decided: int  # points with a result that stands
    live: int  # points being trained by some process
    pending: list[dict[str, Any]]  # points nobody decided or holds, within sweep.n_trials
    runs: list[RunPlan]  # the pending points as training runs, in the order to claim them


def steps_of(point: dict[str, Any], cfg: Config) -> int:
    return int(point.get(STEP_KEY, cfg.train.max_train_steps))


def study_points(cfg: Config) -> list[dict[str, Any]]:
    """Every grid point; a sweep without params (a single run) is one empty point."""
    return grid_points(cfg.sweep.params) if cfg.sweep.params else [{}]


def plan_grid(
    cfg: Config, key_of: Callable[[dict[str, Any]], str], decided: Collection[str], live: Collection[str]
) -> GridPlan:
    sweep = cfg.sweep
    points = study_points(cfg)
    pending = [p for p in points if key_of(p) not in decided and key_of(p) not in live]
    if sweep.n_trials is not None:
        pending = pending[: max(0, sweep.n_trials - len(decided) - len(live))]
    runs = plan_runs(pending, cfg, sweep.share_milestones) if pending else []
    if sweep.workers != 1:
        # Longest run first when runs go side by side: short runs then fill the tail, instead of one
        # long run left alone at the end (4 runs of 20/40/20/40 steps on 2 workers: 60 steps, not 80).
        runs.sort(key=lambda run: -max(steps_of(p, cfg) for p in run.points))
    return GridPlan(len(points), len(decided), len(live), pending, runs)


def grid_finished(cfg: Config, key_of: Callable[[dict[str, Any]], str], decided: Collection[str]) -> bool:
    """Every grid point (or n_trials of them) has a result that stands."""
    points = study_points(cfg)
    done = sum(1 for p in points if key_of(p) in decided)
    return done >= min(len(points), cfg.sweep.n_trials or len(points))
