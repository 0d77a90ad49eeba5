"""What this process may use: the CPU cores and GPUs a scheduler allocated, not what the machine has.

Under SLURM a task on a shared node sees every core and, without a cgroup, often every GPU; using them
would take what belongs to the node's other jobs (two array tasks with one CPU each would both run one
torch thread per core). So ``sweep.workers=auto`` and the CPU thread split read SLURM's allocation first:
``SLURM_CPUS_PER_TASK`` (else ``SLURM_CPUS_ON_NODE``) for cores, ``CUDA_VISIBLE_DEVICES`` (set by SLURM's
GPU plugin) or ``SLURM_GPUS_ON_NODE`` for devices.
"""

from __future__ import annotations

import os


def _positive_int(name: str) -> int | None:
    value = os.environ.get(name, "").strip()
    return int(value) if value.isdigit() and int(value) > 0 else None


def in_slurm_job() -> bool:
    return bool(os.environ.get("SLURM_JOB_ID"))


def affinity_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def allocated_cores() -> int:
    """Cores this process may use: its CPU affinity, capped by the SLURM allocation inside a job."""
    cores = affinity_cores()
    if in_slurm_job():
        slurm = _positive_int("SLURM_CPUS_PER_TASK") or _positive_int("SLURM_CPUS_ON_NODE")
        if slurm:
            cores = min(cores, slurm)
    return max(1, cores)


def allocated_gpu_count(visible: int) -> int:
    """How many of the ``visible`` CUDA devices are ours. CUDA_VISIBLE_DEVICES already limits what torch
    sees; inside a SLURM job without it, SLURM_GPUS_ON_NODE caps the count (0 when the job has none)."""
    if in_slurm_job() and not os.environ.get("CUDA_VISIBLE_DEVICES", "").strip():
        gpus = os.environ.get("SLURM_GPUS_ON_NODE", "").strip()
        if gpus.isdigit():
            return min(visible, int(gpus))
    return visible
