"""Timed sweeps through the real driver (``sdsweep.sweep.driver.run_sweep``): the one definition of the
tiny sweep, its arms and how an arm is timed, shared by the sweep-cost (1) and parallel (5) sections.

Every sweep runs in a fresh ``paths.root``, so no latent cache, study or finished grid point carries over
from one arm or round to the next.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# The tiny model with a cheap evaluation, the same in every arm so that it cancels. Everything else is the
# seed study's own config (``+sweep=lr_steps``), keep_best_k=3 included: an arm pays what a user's sweep
# pays, deleting the weights of trials outside the best 3 too.
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
    # Costs paid once per sweep and identical in every arm (baseline evaluation, the HTML report) are
    # left out, so that a ratio measures what the arms do differently.
    "eval.baseline=false",
    "sweep.build_report=false",
]

# What sdsweep's features buy, one at a time. The in-process arms differ only in cache and sharing;
# full_subprocess is the default way (worker pool, one process per run).
ARMS: dict[str, list[str]] = {
    "plain": ["train.use_latent_cache=false", "sweep.share_milestones=false", "sweep.isolation=inprocess"],
    "cache": ["train.use_latent_cache=true", "sweep.share_milestones=false", "sweep.isolation=inprocess"],
    "full": ["train.use_latent_cache=true", "sweep.share_milestones=true", "sweep.isolation=inprocess"],
    "full_subprocess": [
        "train.use_latent_cache=true",
        "sweep.share_milestones=true",
        "sweep.isolation=subprocess",
    ],
}


@dataclass(frozen=True)
class Grid:
    """A learning rate x training steps grid (the seed study's shape)."""

    learning_rates: tuple[float, ...]
    steps: tuple[int, ...]

    def overrides(self) -> list[str]:
        return [
            f"sweep.learning_rates=[{','.join(f'{lr:g}' for lr in self.learning_rates)}]",
            f"sweep.steps=[{','.join(str(s) for s in self.steps)}]",
        ]

    def as_json(self) -> dict[str, list]:
        return {"learning_rates": list(self.learning_rates), "steps": list(self.steps)}


# The seed grid's shape, 2 learning rates x 4 step counts, with enough steps that training, not the
# identical per-trial evaluation, is most of the cost (as it is on a GPU at 512 px).
SEED_SHAPE_GRID = Grid((1e-4, 1e-3), (20, 40, 60, 80))
QUICK_GRID = Grid((1e-4,), (1, 2))


# ---- one timed sweep ----------------------------------------------------------------------------------
def timed_sweep(overrides: list[str]) -> dict[str, Any]:
    """One real sweep (the driver starts its own worker pool when not in-process): wall and CPU seconds,
    what it launched, and the evaluation seconds from its trial records (where the time went)."""
    from sdsweep.sweep.driver import run_sweep

    cpu_before = cpu_seconds()
    started = time.perf_counter()
    outcome = run_sweep(overrides)
    wall = time.perf_counter() - started
    cpu = cpu_seconds() - cpu_before
    # A sweep whose trials failed is faster and measures nothing: the section reports an error instead.
    if not outcome.finished:
        raise RuntimeError(f"sweep {overrides[-1]} did not finish: {outcome.states}")
    return {
        "wall_seconds": wall,
        "cpu_seconds": cpu,
        "runs_launched": outcome.runs_launched,
        "trials_launched": outcome.trials_launched,
        "states": outcome.states,
        "finished": outcome.finished,
        **eval_seconds(Path(outcome.study_dir)),
    }


def eval_seconds(study_dir: Path) -> dict[str, float]:
    """Evaluation seconds summed over the study's trial records, and the baseline's."""
    from sdsweep import io
    from sdsweep.study.record import read_record_or_none, record_path

    paths = io.StudyPaths(study_dir)
    records = [read_record_or_none(record_path(d)) for d in paths.trial_dirs()]
    baseline = read_record_or_none(record_path(paths.baseline))
    return {
        "eval_seconds": sum(r.eval_seconds or 0.0 for r in records if r),
        "baseline_eval_seconds": float(baseline.eval_seconds or 0.0) if baseline else 0.0,
    }


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


# ---- arms, side by side -------------------------------------------------------------------------------
def warm_up(workdir: Path) -> None:
    """Untimed one-point sweeps, in-process and through the worker pool, so that imports, first-call costs
    and the start of the pool's fork server (which then serves every later pool arm of this process) do
    not land on whichever arm happens to run first."""
    grid = Grid((1e-4,), (1,))
    for arm in ("full", "full_subprocess"):
        timed_sweep(
            TINY_SWEEP
            + ARMS[arm]
            + grid.overrides()
            + [f"study=warmup-{arm}", f"paths.root={workdir / 'warmup'}"]
        )


def compare_arms(
    arms: dict[str, list[str]],
    common: list[str],
    rounds: int,
    workdir: Path,
    tag: str,
    log: Callable[[str], None],
) -> dict[str, dict[str, Any]]:
    """Each arm ``rounds`` times, a fresh root each time; per arm, the fastest round's row.

    Contention only ever adds time, so the fastest round is the best estimate of an arm's cost;
    ``all_wall_seconds`` and ``all_cpu_seconds`` keep every round.
    """
    rows: dict[str, list[dict[str, Any]]] = {arm: [] for arm in arms}
    for index in range(rounds):
        # Alternate the order so slow drift (other jobs on the machine) does not favour one arm.
        for arm in arms if index % 2 == 0 else reversed(list(arms)):
            log(f"{tag} arm '{arm}' round {index + 1}: {' '.join(arms[arm])}")
            root = workdir / f"{tag}-{arm}-{index}"
            row = timed_sweep(TINY_SWEEP + common + arms[arm] + [f"study={tag}-{arm}", f"paths.root={root}"])
            rows[arm].append(row)
            log(
                f"  {row['wall_seconds']:.1f}s wall, {row['cpu_seconds']:.1f}s CPU, "
                f"{row['runs_launched']} training runs"
            )
    return {
        arm: {
            **min(found, key=lambda r: r["wall_seconds"]),
            "all_wall_seconds": [r["wall_seconds"] for r in found],
            "all_cpu_seconds": [r["cpu_seconds"] for r in found],
        }
        for arm, found in rows.items()
    }


def add_ratio_to_plain(arms: dict[str, dict[str, Any]]) -> None:
    """``ratio_to_plain`` on every arm: its wall time over the plain arm's."""
    plain = arms["plain"]["wall_seconds"]
    for row in arms.values():
        row["ratio_to_plain"] = row["wall_seconds"] / plain
