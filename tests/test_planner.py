"""The grid planner is pure: the study's state comes in as point keys, the plan comes out (no Optuna, no I/O)."""

from __future__ import annotations

from conftest import TINY_OVERRIDES, compose

from sdsweep.study.plan import point_key
from sdsweep.study.planner import grid_finished, plan_grid


def grid_cfg(tmp_path, *extra: str):
    return compose(
        TINY_OVERRIDES
        + ["+sweep=lr_steps", "sweep.learning_rates=[1e-4,1e-3]", "sweep.steps=[1,2]"]
        + [f"paths.root={tmp_path}", *extra]
    )


def test_the_plan_leaves_out_decided_and_live_points_and_shares_milestones(tmp_path):
    cfg = grid_cfg(tmp_path)
    fresh = plan_grid(cfg, point_key, decided=set(), live=set())
    assert (fresh.points, fresh.decided, fresh.live, len(fresh.pending)) == (4, 0, 0, 4)
    assert len(fresh.runs) == 2 and all(run.shared for run in fresh.runs)  # one run per learning rate
    first_run = fresh.runs[0]
    decided = {point_key(p) for p in first_run.points}
    live = {point_key(fresh.runs[1].points[0])}
    later = plan_grid(cfg, point_key, decided=decided, live=live)
    assert (later.decided, later.live, len(later.pending)) == (2, 1, 1)
    assert not grid_finished(cfg, point_key, decided)
    assert grid_finished(cfg, point_key, {point_key(p) for p in fresh.pending})


def test_n_trials_caps_the_pending_points_and_side_by_side_runs_go_longest_first(tmp_path):
    cfg = grid_cfg(tmp_path, "sweep.n_trials=3", "sweep.share_milestones=false", "sweep.workers=2")
    plan = plan_grid(cfg, point_key, decided=set(), live=set())
    assert len(plan.pending) == 3
    steps = [int(run.points[0]["train.max_train_steps"]) for run in plan.runs]
    assert steps == sorted(steps, reverse=True)
