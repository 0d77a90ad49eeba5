"""Section 1, sweep cost: the seed grid through the real driver, with sdsweep's features one at a time.

``plain`` trains every grid point from scratch and runs the VAE/text encoder every step; ``cache`` encodes
latents and text once per study; ``full`` (the default features) adds milestone sharing, one run per
learning rate evaluated at each step count; ``full_subprocess`` is ``full`` in the default isolation
(the worker pool). Target (issue #7): ``full`` at most half the plain sweep's wall time.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench import sweeps


@dataclass(frozen=True)
class SweepCostPlan:
    grid: sweeps.Grid
    subprocess_arm: bool  # the full_subprocess arm (skipped in --quick: it starts a worker pool)
    rounds: int  # each arm runs this many times (alternating order); the fastest counts


FULL_PLAN = SweepCostPlan(sweeps.SEED_SHAPE_GRID, subprocess_arm=True, rounds=2)
QUICK_PLAN = SweepCostPlan(sweeps.QUICK_GRID, subprocess_arm=False, rounds=1)


def run(quick: bool, workdir: Path, log: Callable[[str], None]) -> dict[str, Any]:
    plan = QUICK_PLAN if quick else FULL_PLAN
    sweeps.warm_up(workdir)
    names = [arm for arm in sweeps.ARMS if plan.subprocess_arm or arm != "full_subprocess"]
    arms = sweeps.compare_arms(
        {arm: sweeps.ARMS[arm] for arm in names}, plan.grid.overrides(), plan.rounds, workdir, "bench", log
    )
    sweeps.add_ratio_to_plain(arms)
    out: dict[str, Any] = {
        "grid": plan.grid.as_json(),
        "overrides_common": sweeps.TINY_SWEEP,
        "arms": arms,
        "ratio_full_vs_plain": arms["full"]["ratio_to_plain"],
    }
    if "full_subprocess" in arms:
        # The price of crash isolation: a worker process per run, forked from the pool's fork server.
        out["subprocess_overhead"] = arms["full_subprocess"]["wall_seconds"] / arms["full"]["wall_seconds"]
    return out
