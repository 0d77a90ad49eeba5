"""Section 5, parallel (GitHub issue #11): what the worker pool buys, measured.

1. Workers: the same 4-run grid (2 learning rates x 2 step counts, no milestone sharing, so 4 independent
   runs) with ``sweep.workers=1`` and ``sweep.workers=2``; the wall-time ratio (issue target <= 0.6 on 2 cores).
   Runs of 80 and 160 steps (~4-8 s each on the tiny model): with 20 and 40 steps a run took ~1.5 s, and
   the ~0.9 s of every sweep that no number of workers splits (driver setup, a worker's start and first-run
   warm-up, the closing table) decided the ratio (0.60-0.62 measured) instead of what the pool does with
   the runs; a user's runs take minutes.
2. Isolation: the default way (worker pool + latent cache + milestone sharing) against the plain way (no
   cache, no sharing, in-process) and against the same features in-process, on the sweep-cost grid;
   issue target: default <= 0.5x plain. These are the sweep-cost section's ``full_subprocess``, ``plain``
   and ``full`` arms (``bench.sweeps``), under the names issue #11 uses.

Usage: ``python -m bench.parallel --out bench/parallel.json [--quick] [--rounds N]``, or as the
``parallel`` section of ``python -m bench``. Every arm runs the real sweep driver in a fresh folder; the
fastest of ``rounds`` alternating rounds counts (contention only ever adds time).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from bench import sweeps

ISOLATION_ARMS: dict[str, list[str]] = {
    "plain": sweeps.ARMS["plain"],
    "inprocess": sweeps.ARMS["full"],
    "default": sweeps.ARMS["full_subprocess"],
}
WORKER_ARMS: dict[str, list[str]] = {
    "1_worker": ["sweep.workers=1"],
    "2_workers": ["sweep.workers=2"],
}
# No milestone sharing: every grid point is its own run, so there are 4 runs to spread over the workers.
WORKER_COMMON = ["train.use_latent_cache=true", "sweep.share_milestones=false", "sweep.isolation=subprocess"]


@dataclass(frozen=True)
class ParallelPlan:
    worker_grid: sweeps.Grid
    isolation_grid: sweeps.Grid
    rounds: int


# Three rounds: the one-worker arm's two torch threads make it the noisiest (19-25 s for the same runs).
FULL_PLAN = ParallelPlan(sweeps.Grid((1e-4, 1e-3), (80, 160)), sweeps.SEED_SHAPE_GRID, rounds=3)
QUICK_PLAN = ParallelPlan(sweeps.Grid((1e-4, 1e-3), (1, 2)), sweeps.QUICK_GRID, rounds=1)


def log(message: str) -> None:
    print(f"[bench parallel] {message}", flush=True)


def run(
    quick: bool, workdir: Path, log: Callable[[str], None] = log, rounds: int | None = None
) -> dict[str, Any]:
    """Both comparisons, with their verdicts."""
    from bench.verdicts import PARALLEL_TARGETS, judge

    plan = QUICK_PLAN if quick else FULL_PLAN
    if rounds:
        plan = replace(plan, rounds=rounds)
    sweeps.warm_up(workdir)
    common = WORKER_COMMON + plan.worker_grid.overrides()
    workers = sweeps.compare_arms(WORKER_ARMS, common, plan.rounds, workdir, "workers", log)
    isolation = sweeps.compare_arms(
        ISOLATION_ARMS, plan.isolation_grid.overrides(), plan.rounds, workdir, "isolation", log
    )
    sweeps.add_ratio_to_plain(isolation)
    section = {
        "cpu_count": os.cpu_count(),
        "quick": quick,
        "workers": {
            "grid": plan.worker_grid.as_json(),
            "overrides": sweeps.TINY_SWEEP + WORKER_COMMON,
            "arms": workers,
            "ratio_2_vs_1": workers["2_workers"]["wall_seconds"] / workers["1_worker"]["wall_seconds"],
        },
        "isolation": {
            "grid": plan.isolation_grid.as_json(),
            "overrides": sweeps.TINY_SWEEP,
            "arms": isolation,
            "ratio_default_vs_plain": isolation["default"]["ratio_to_plain"],
            "ratio_default_vs_inprocess": isolation["default"]["wall_seconds"]
            / isolation["inprocess"]["wall_seconds"],
            # CPU seconds: steadier than wall time on a shared machine (reported next to it, not a target).
            "cpu_ratio_default_vs_plain": isolation["default"]["cpu_seconds"]
            / isolation["plain"]["cpu_seconds"],
        },
    }
    section["verdicts"] = judge(section, PARALLEL_TARGETS)
    return section


def main(argv: list[str] | None = None) -> int:
    from bench.section import run_section
    from bench.table import parallel_table
    from sdsweep.io import atomic_write_json

    parser = argparse.ArgumentParser(prog="python -m bench.parallel", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("bench/parallel.json"))
    parser.add_argument("--quick", action="store_true", help="tiny grids, one round (smoke test)")
    parser.add_argument("--rounds", type=int, default=None, help="rounds per arm (default 3; quick 1)")
    parser.add_argument("--workdir", type=Path, default=None, help="where the sweeps write (default: temp)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="sdsweep-bench-parallel-") as tmp:
        workdir = args.workdir or Path(tmp)
        section = run_section("parallel", lambda: run(args.quick, workdir, rounds=args.rounds), log)
    section["quick"] = args.quick
    atomic_write_json(args.out, {"parallel": section})
    print(parallel_table(section))
    log(f"wrote {args.out}")
    return 1 if "error" in section else 0


# Guarded: the worker pool's fork server imports the main module.
if __name__ == "__main__":
    sys.exit(main())
