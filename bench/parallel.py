"""The parallel section of ``make bench`` (GitHub issue #11): what the worker pool buys, measured.

1. Workers: the same 4-run grid (2 learning rates x 2 step counts, no milestone sharing, so 4 independent
   runs) with ``sweep.workers=1`` and ``sweep.workers=2``; the wall-time ratio (issue target <= 0.6 on 2 cores).
2. Isolation: the default way (worker pool + latent cache + milestone sharing) against the plain way (no
   cache, no sharing, in-process) and against the same features in-process, on the sweep-cost grid of
   ``bench`` (2 learning rates x steps 20/40/60/80); issue target: default <= 0.5x plain.

Usage: ``python -m bench.parallel --out bench/parallel.json [--quick]``; from ``make bench``:
``run_parallel_bench(results)`` adds ``results["parallel"]``. Every arm runs the real sweep driver in a
fresh folder; the fastest of ``rounds`` alternating rounds counts (contention only ever adds time).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("MPLBACKEND", "Agg")

TARGETS = {
    "two_vs_one_worker": 0.6,  # issue #11: 2 workers on 2 cores take at most 0.6x the time of 1
    "default_vs_plain": 0.5,  # issue #11: the default isolation at most half the plain way
}

# The tiny model with the cheap evaluation (the same in every arm, so it cancels); the baseline and the
# report are paid once per sweep whatever the arm, so they are left out. Mirrors bench's sweep.
TINY_SWEEP = [
    "model=tiny",
    "data=demo",
    "eval=tiny",
    "tracking=none",
    "method=full",
    "train.train_batch_size=2",
    "eval.metrics=[clip_score,appropriate_rate,val_loss]",
    "eval.num_images_per_prompt=1",
    "eval.num_inference_steps=2",
    "+sweep=lr_steps",
    "eval.baseline=false",
    "sweep.build_report=false",
    "sweep.keep_best_k=-1",
]
# "plain" is bench's plain arm: every point trained from scratch, pixels encoded every step.
ISOLATION_ARMS: dict[str, list[str]] = {
    "plain": ["train.use_latent_cache=false", "sweep.share_milestones=false", "sweep.isolation=inprocess"],
    "inprocess": ["train.use_latent_cache=true", "sweep.share_milestones=true", "sweep.isolation=inprocess"],
    "default": ["train.use_latent_cache=true", "sweep.share_milestones=true", "sweep.isolation=subprocess"],
}
WORKER_ARMS: dict[str, list[str]] = {
    "1_worker": ["sweep.workers=1"],
    "2_workers": ["sweep.workers=2"],
}
WORKER_COMMON = ["train.use_latent_cache=true", "sweep.share_milestones=false", "sweep.isolation=subprocess"]


@dataclass(frozen=True)
class ParallelPlan:
    worker_grid: tuple[tuple[float, ...], tuple[int, ...]]
    isolation_grid: tuple[tuple[float, ...], tuple[int, ...]]
    rounds: int


FULL_PLAN = ParallelPlan(((1e-4, 1e-3), (20, 40)), ((1e-4, 1e-3), (20, 40, 60, 80)), 2)
QUICK_PLAN = ParallelPlan(((1e-4, 1e-3), (1, 2)), ((1e-4,), (1, 2)), 1)


def log(message: str) -> None:
    print(f"[bench parallel] {message}", flush=True)


def grid_overrides(grid: tuple[tuple[float, ...], tuple[int, ...]]) -> list[str]:
    lrs, steps = grid
    return [
        f"sweep.learning_rates=[{','.join(f'{lr:g}' for lr in lrs)}]",
        f"sweep.steps=[{','.join(str(s) for s in steps)}]",
    ]


def cpu_seconds() -> float:
    """User + system CPU of this process and its finished children (the pool's workers): on a shared
    machine this is steadier than wall time, which other processes' load stretches."""
    import resource

    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime + forked_workers_cpu_seconds()


def forked_workers_cpu_seconds() -> float:
    """Workers forked from the pool's fork server are its children, not ours: the fork server reaps them,
    so their CPU is in its "children" times (cutime/cstime in /proc/<pid>/stat)."""
    from multiprocessing import forkserver

    import psutil

    pid = getattr(getattr(forkserver, "_forkserver", None), "_forkserver_pid", None)
    if not pid:
        return 0.0
    try:
        times = psutil.Process(pid).cpu_times()
    except psutil.Error:
        return 0.0
    return times.children_user + times.children_system


def timed_sweep(overrides: list[str]) -> dict[str, Any]:
    """One real sweep through the driver (which starts its own worker pool when not in-process)."""
    from sdsweep.sweep.driver import run_sweep

    cpu_before = cpu_seconds()
    started = time.perf_counter()
    outcome = run_sweep(overrides)
    seconds = time.perf_counter() - started
    cpu = cpu_seconds() - cpu_before
    if not outcome.finished:
        raise RuntimeError(f"sweep {overrides[-1]} did not finish: {outcome.states}")
    return {
        "wall_seconds": seconds,
        "cpu_seconds": cpu,
        "runs_launched": outcome.runs_launched,
        "trials_launched": outcome.trials_launched,
        "states": outcome.states,
    }


def compare(arms: dict[str, list[str]], common: list[str], rounds: int, workdir: Path, tag: str) -> dict:
    """Each arm ``rounds`` times in alternating order, a fresh folder each time; the fastest counts."""
    rows: dict[str, list[dict[str, Any]]] = {arm: [] for arm in arms}
    for index in range(rounds):
        for arm in arms if index % 2 == 0 else reversed(list(arms)):
            root = workdir / f"{tag}-{arm}-{index}"
            overrides = TINY_SWEEP + common + arms[arm] + [f"study={tag}-{arm}", f"paths.root={root}"]
            log(f"{tag} arm '{arm}' round {index + 1}: {' '.join(arms[arm])}")
            row = timed_sweep(overrides)
            rows[arm].append(row)
            log(
                f"  {row['wall_seconds']:.1f}s wall, {row['cpu_seconds']:.1f}s CPU, {row['runs_launched']} runs"
            )
    return {
        arm: {
            **min(found, key=lambda r: r["wall_seconds"]),
            "all_wall_seconds": [r["wall_seconds"] for r in found],
            "all_cpu_seconds": [r["cpu_seconds"] for r in found],
        }
        for arm, found in rows.items()
    }


def warm_up(workdir: Path) -> None:
    """One untimed one-point sweep: imports, tiny-model builds and first-call costs land here."""
    overrides = TINY_SWEEP + ISOLATION_ARMS["inprocess"] + grid_overrides(((1e-4,), (1,)))
    timed_sweep(overrides + ["study=warmup", f"paths.root={workdir / 'warmup'}"])


def bench_parallel(plan: ParallelPlan, workdir: Path) -> dict[str, Any]:
    warm_up(workdir)
    workers = compare(
        WORKER_ARMS, WORKER_COMMON + grid_overrides(plan.worker_grid), plan.rounds, workdir, "workers"
    )
    isolation = compare(
        ISOLATION_ARMS, grid_overrides(plan.isolation_grid), plan.rounds, workdir, "isolation"
    )
    plain = isolation["plain"]["wall_seconds"]
    for row in isolation.values():
        row["ratio_to_plain"] = row["wall_seconds"] / plain
    return {
        "cpu_count": os.cpu_count(),
        "workers": {
            "grid": {"learning_rates": list(plan.worker_grid[0]), "steps": list(plan.worker_grid[1])},
            "overrides": TINY_SWEEP + WORKER_COMMON,
            "arms": workers,
            "ratio_2_vs_1": workers["2_workers"]["wall_seconds"] / workers["1_worker"]["wall_seconds"],
        },
        "isolation": {
            "grid": {"learning_rates": list(plan.isolation_grid[0]), "steps": list(plan.isolation_grid[1])},
            "overrides": TINY_SWEEP,
            "arms": isolation,
            "ratio_default_vs_plain": isolation["default"]["ratio_to_plain"],
            "ratio_default_vs_inprocess": isolation["default"]["wall_seconds"]
            / isolation["inprocess"]["wall_seconds"],
            # CPU seconds: steadier than wall time on a shared machine (reported next to it, not a target).
            "cpu_ratio_default_vs_plain": isolation["default"]["cpu_seconds"]
            / isolation["plain"]["cpu_seconds"],
        },
    }


def verdicts(section: dict[str, Any]) -> dict[str, Any]:
    measured = {
        "two_vs_one_worker": section["workers"]["ratio_2_vs_1"],
        "default_vs_plain": section["isolation"]["ratio_default_vs_plain"],
    }
    return {
        key: {"value": value, "target": f"≤ {TARGETS[key]:g}", "pass": value <= TARGETS[key]}
        for key, value in measured.items()
    }


def run_parallel_bench(
    out: dict[str, Any], quick: bool = False, workdir: Path | None = None, rounds: int | None = None
) -> dict[str, Any]:
    """Measure both comparisons; the section is stored as ``out["parallel"]`` and returned.

    A failure is recorded as ``{"error": ...}`` so the rest of ``make bench`` still reports.
    """
    plan = QUICK_PLAN if quick else FULL_PLAN
    if rounds:
        plan = ParallelPlan(plan.worker_grid, plan.isolation_grid, rounds)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="sdsweep-bench-parallel-") as tmp:
        try:
            section = bench_parallel(plan, workdir or Path(tmp))
            section["verdicts"] = verdicts(section)
        except Exception as error:  # a broken section is reported, not lost
            section = {"error": f"{type(error).__name__}: {error}"}
            log(f"failed: {section['error']}")
    section["quick"] = quick
    section["section_seconds"] = time.perf_counter() - started
    out["parallel"] = section
    return section


def table(section: dict[str, Any]) -> str:
    if "error" in section:
        return f"Parallel: failed ({section['error']})"
    w, i = section["workers"], section["isolation"]
    lines = [
        f"Parallel sweeps ({section['cpu_count']} CPU cores)",
        f"   workers, grid lr {w['grid']['learning_rates']} x steps {w['grid']['steps']} (4 independent runs)",
    ]
    for arm, row in w["arms"].items():
        lines.append(
            f"   {arm:<12}{row['wall_seconds']:>8.1f} s{row.get('cpu_seconds', float('nan')):>8.1f} s CPU{row['runs_launched']:>4} runs"
        )
    lines.append(f"   2 workers / 1 worker: {w['ratio_2_vs_1']:.2f}x")
    lines.append(f"   isolation, grid lr {i['grid']['learning_rates']} x steps {i['grid']['steps']}")
    for arm, row in i["arms"].items():
        lines.append(
            f"   {arm:<12}{row['wall_seconds']:>8.1f} s{row.get('cpu_seconds', float('nan')):>8.1f} s CPU{row['runs_launched']:>4} runs{row['ratio_to_plain']:>7.2f}x plain"
        )
    lines.append(f"   default / in-process: {i['ratio_default_vs_inprocess']:.2f}x")
    for key, verdict in section.get("verdicts", {}).items():
        lines.append(
            f"   {key:<20}{verdict['value']:>7.3f}  {verdict['target']:<7} {'PASS' if verdict['pass'] else 'FAIL'}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.parallel", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("bench/parallel.json"))
    parser.add_argument("--quick", action="store_true", help="tiny grids, one round (smoke test)")
    parser.add_argument("--rounds", type=int, default=None, help="rounds per arm (default 2; quick 1)")
    parser.add_argument("--workdir", type=Path, default=None, help="where the sweeps write (default: temp)")
    args = parser.parse_args(argv)
    results: dict[str, Any] = {}
    section = run_parallel_bench(results, quick=args.quick, workdir=args.workdir, rounds=args.rounds)
    from sdsweep.io import atomic_write_json

    atomic_write_json(args.out, results)
    print(table(section))
    log(f"wrote {args.out}")
    return 1 if "error" in section else 0


if __name__ == "__main__":
    sys.exit(main())
