"""Grid planning: which grid points share one training run."""

from __future__ import annotations

from conftest import TINY_OVERRIDES, compose

from sdsweep.study.plan import STEP_KEY, grid_points, overrides_for, plan_runs, point_key


def test_grid_points_cover_the_product():
    cfg = compose(
        TINY_OVERRIDES + ["+sweep=lr_steps", "sweep.learning_rates=[1e-4,1e-3]", "sweep.steps=[1,2,3]"]
    )
    points = grid_points(cfg.sweep.params)
    assert len(points) == 6 and len({point_key(p) for p in points}) == 6


def test_constant_schedule_shares_one_run_per_learning_rate():
    cfg = compose(
        TINY_OVERRIDES + ["+sweep=lr_steps", "sweep.learning_rates=[1e-4,1e-3]", "sweep.steps=[3,1,2]"]
    )
    runs = plan_runs(grid_points(cfg.sweep.params), cfg, share_milestones=True)
    assert len(runs) == 2
    assert all(r.shared and r.milestones == [1, 2, 3] for r in runs)


def test_cosine_schedule_or_sharing_off_trains_each_point():
    cosine = compose(TINY_OVERRIDES + ["+sweep=lr_steps", "sweep.steps=[1,2]", "train.lr_scheduler=cosine"])
    assert len(plan_runs(grid_points(cosine.sweep.params), cosine, share_milestones=True)) == 4
    constant = compose(TINY_OVERRIDES + ["+sweep=lr_steps", "sweep.steps=[1,2]"])
    assert len(plan_runs(grid_points(constant.sweep.params), constant, share_milestones=False)) == 4


def test_point_keys_survive_float_round_trips():
    assert point_key({"method.learning_rate": 1e-05, STEP_KEY: 400.0}) == point_key(
        {"method.learning_rate": 0.00001, STEP_KEY: 400}
    )


def test_group_params_become_group_overrides_first():
    assert overrides_for({"method.learning_rate": 1e-4, "model": "tiny_sd21"}) == [
        "model=tiny_sd21",
        "method.learning_rate=0.0001",
    ]
