"""Submit the current study as a SLURM job array of ``scripts/slurm/sdsweep_array.sbatch``, sized from the plan.

Every task runs ``python -m sdsweep <overrides>`` against the shared storage and claims training runs there
(sdsweep/sweep/claims.py), so a task beyond the number of runs only waits and exits: that is a warning,
not an error. Plain ``sbatch`` of the same script keeps working; this only adds the sizing, the checks a
task would otherwise fail on minutes later in the queue, and the command that watches the study.
"""

from __future__ import annotations

import math
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from sdsweep.errors import ConfigError

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "slurm" / "sdsweep_array.sbatch"


@dataclass
class Sizing:
    runs: int  # training runs the plan needs (grid: one per run; other samplers: one per trial)
    workers_per_task: int  # sweep.workers=auto in a task: one per GPU it asks for, 1 on CPU
    needed: int  # array tasks that keep every worker busy at the start


def gpus_per_task(sbatch_options: list[str], script: Path = SCRIPT) -> int:
    """The task's GPU count: the last --gpus-per-task on the command line, else the script's #SBATCH line."""
    pattern = re.compile(r"--gpus-per-task[= ](\d+)")
    for option in reversed(sbatch_options):
        found = pattern.fullmatch(option.strip())
        if found:
            return int(found.group(1))
    lines = " ".join(sbatch_options)
    found = pattern.search(lines)
    if found:
        return int(found.group(1))
    for line in script.read_text().splitlines():
        if line.startswith("#SBATCH"):
            found = pattern.search(line)
            if found:
                return int(found.group(1))
    return 0


def size(overrides: list[str], sbatch_options: list[str], script: Path = SCRIPT) -> Sizing:
    """Tasks needed for the plan (sdsweep/study/plan.py, the grid `--plan` prints)."""
    from sdsweep.study.plan import grid_points, plan_runs
    from sdsweep.sweep.run_config import build_config

    cfg = build_config(overrides)
    sweep = cfg.sweep
    if sweep.sampler == "grid":
        points = grid_points(sweep.params) if sweep.params else [{}]
        if sweep.n_trials is not None:
            points = points[: sweep.n_trials]
        runs = len(plan_runs(points, cfg, sweep.share_milestones))
    else:
        runs = sweep.n_trials or 20
    workers = max(1, gpus_per_task(sbatch_options, script))
    return Sizing(runs=runs, workers_per_task=workers, needed=max(1, math.ceil(runs / workers)))


def sbatch_command(
    tasks: int, sbatch_options: list[str], overrides: list[str], script: Path = SCRIPT
) -> list[str]:
    return ["sbatch", "--parsable", f"--array=0-{tasks - 1}", *sbatch_options, str(script), *overrides]


def submit(tasks: int, sbatch_options: list[str], overrides: list[str], script: Path = SCRIPT) -> int:
    """Check, size, submit; prints the job id and the watch command. Returns the exit code."""
    if tasks < 1:
        raise ConfigError(f"--tasks {tasks}: give the number of array tasks, 1 or more")
    if shutil.which("sbatch") is None:
        raise ConfigError("sbatch not found: run this on a SLURM login node (or plain `sbatch` the script)")
    if not os.environ.get("SDSWEEP_STORAGE"):
        raise ConfigError(
            "SDSWEEP_STORAGE is not set: every task must share one storage, e.g. "
            "export SDSWEEP_STORAGE=postgresql+psycopg://user@db-host:5432/sdsweep"
        )
    sizing = size(overrides, sbatch_options, script)
    print(
        f"[sdsweep] plan: {sizing.runs} training run(s); {sizing.workers_per_task} worker(s) per task; "
        f"{sizing.needed} task(s) keep every worker busy"
    )
    if tasks > sizing.needed:
        print(
            f"[sdsweep] warning: --tasks {tasks} is more than the {sizing.needed} the plan needs; the extra "
            "tasks wait for a run to take over and then exit (they hold their allocation meanwhile)"
        )
    Path("logs").mkdir(exist_ok=True)  # the script's --output folder: SLURM does not create it
    proc = subprocess.run(
        sbatch_command(tasks, sbatch_options, overrides, script), capture_output=True, text=True
    )
    if proc.returncode != 0:
        print(
            f"[sdsweep] sbatch failed (exit {proc.returncode}): {proc.stderr.strip() or proc.stdout.strip()}"
        )
        return proc.returncode or 1
    job = proc.stdout.strip().split(";")[0]
    root = os.environ.get("SDSWEEP_ROOT") or str(Path.cwd() / "experiments")
    study = study_name(overrides)
    print(f"[sdsweep] submitted job {job}: {tasks} task(s), logs in logs/sdsweep-{job}_<task>.out")
    print(f"[sdsweep] watch: watch -n 30 'squeue -j {job}; tail -n 3 {root}/{study}/results.csv'")
    return 0


def study_name(overrides: list[str]) -> str:
    from sdsweep.sweep.run_config import build_config

    return build_config(overrides).study
