"""The SLURM path on a real one-node SLURM cluster (tests/slurm.py, recipe in tests/SLURM.md): the real
``scripts/slurm/sdsweep_array.sbatch`` submitted with sbatch against a real PostgreSQL server, judged by
what a user sees: job states and exit codes, the task logs, the study in storage, results.csv, the report,
and the processes left on the node.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pandas as pd
import pytest
from drivers import wait_until
from test_parallel import (
    PARALLEL_OVERRIDES,
    STEPS,
    assert_grid_complete_once,
    complete_records,
    first_history_step,
    has_checkpoint,
    load_trials,
    point_of,
    trained_folders,
)

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "slurm" / "sdsweep_array.sbatch"
JOB_TIMEOUT = 300  # seconds for a job to finish (a busy shared CI core is slow)
# Sized for the test node: one CPU per task, no GPU, minutes not a day, SIGTERM well before the limit.
SMALL = ["--cpus-per-task=1", "--gpus-per-task=0", "--time=10"]


@pytest.fixture(scope="module")
def slurm_cluster():
    """slurmctld + slurmd on this host for the module; munged started if none answers."""
    from slurm import SlurmCluster, missing_reason

    reason = missing_reason()
    if reason:
        if os.environ.get("CI"):
            pytest.fail(f"CI must run the SLURM tests: {reason}")
        pytest.skip(reason)
    cluster = SlurmCluster.start()
    yield cluster
    cluster.stop()


@pytest.fixture(autouse=True)
def _tiny_assets(tiny_model_dirs, demo_data_dir, tiny_clip_dir):
    """Build the tiny models before any task would race to build them."""


@pytest.fixture
def job_env(slurm_cluster, postgres_url, tmp_path):
    """The environment sbatch passes on to the tasks (SLURM exports it): storage, results root, python."""
    (tmp_path / "logs").mkdir()
    env = slurm_cluster.env(
        SDSWEEP_STORAGE=postgres_url,
        SDSWEEP_ROOT=str(tmp_path),
        PYTHON=sys.executable,
        PYTHONPATH=str(REPO),
    )
    env.pop("OMP_NUM_THREADS", None)  # what SLURM allocated decides the threads, not the runner's setting
    return env


def overrides(*extra: str) -> list[str]:
    """The grid of tests/test_parallel.py (2 learning rates x 2 step counts, tiny model, no W&B)."""
    return [o for o in PARALLEL_OVERRIDES if not o.startswith("sweep.build_report")] + ["study=slurm", *extra]


def task_logs(tmp_path: Path) -> dict[str, str]:
    return {p.name: p.read_text(errors="replace") for p in sorted((tmp_path / "logs").glob("*.out"))}


def assert_nothing_left(cluster) -> None:
    """No job step and no sdsweep process is left on the node."""
    assert wait_until(lambda: not cluster.job_processes(), 30), cluster.job_processes()


@pytest.mark.slow
def test_array_runs_the_grid_once_with_logs_naming_the_task(slurm_cluster, job_env, postgres_url, tmp_path):
    started = time.monotonic()
    job = slurm_cluster.sbatch("--array=0-1", *SMALL, str(SCRIPT), *overrides(), env=job_env, cwd=tmp_path)
    states = slurm_cluster.wait_done(job, JOB_TIMEOUT)
    logs = task_logs(tmp_path)
    assert {j["JobState"] for j in states.values()} == {"COMPLETED"}, (states, logs)
    assert sorted(logs) == [f"sdsweep-{job}_0.out", f"sdsweep-{job}_1.out"], logs
    study_dir = tmp_path / "slurm"
    assert_grid_complete_once(study_dir, postgres_url)
    assert set(trained_folders(study_dir).values()) == {1}, trained_folders(study_dir)
    host = slurm_cluster.host
    for task in (0, 1):
        log = logs[f"sdsweep-{job}_{task}.out"]
        assert f"task {task} on {host}-task{task}" in log, log
        # One CPU each: one worker with one torch thread, not one per core of the node.
        assert "starting 1 worker(s) on CPU, 1 thread(s) each" in log, log
        assert "Traceback" not in log, log
    assert (study_dir / "report.html").exists() and (study_dir / "report.md").exists()
    print(f"array of 2 tasks: {time.monotonic() - started:.1f}s")
    assert_nothing_left(slurm_cluster)


def wait_for_checkpoint(cluster, job: str, study_dir: Path) -> None:
    """Until the task has written its first milestone checkpoint (and still runs)."""
    assert wait_until(lambda: has_checkpoint(study_dir), JOB_TIMEOUT), cluster.job_states(job)
    assert any(j["JobState"] == "RUNNING" for j in cluster.job_states(job).values()), cluster.job_states(job)


ONE_RUN = ("sweep.learning_rates=[0.0001]",)  # one run, milestones 2 and 4: enough to show a resume


def assert_one_run_complete_once(study_dir: Path, storage: str) -> None:
    """Both points of ONE_RUN COMPLETE exactly once in storage and in results.csv (the handed-back trials
    keep their folders, so folders are not counted here; the resume is checked from the history)."""
    trials = load_trials(study_dir, storage)
    complete = Counter(point_of(t) for t in trials if t.state.name == "COMPLETE")
    assert complete == Counter({(1e-4, s): 1 for s in STEPS}), complete
    results = pd.read_csv(study_dir / "results.csv")
    assert len(results) == len(STEPS) and (results["state"] == "COMPLETE").all(), results


def assert_resumed_from_checkpoint(study_dir: Path) -> None:
    resumed = [r for r in complete_records(study_dir) if r.get("step") == max(STEPS)]
    starts = sorted(first_history_step(r) for r in resumed)
    assert min(STEPS) + 1 in starts, f"no run resumed from the step-{min(STEPS)} checkpoint: {starts}"


@pytest.mark.slow
def test_requeue_hands_the_run_back_and_the_requeued_task_resumes_it(
    slurm_cluster, job_env, postgres_url, tmp_path
):
    started = time.monotonic()
    study_dir = tmp_path / "slurm"
    args = overrides(*ONE_RUN)
    job = slurm_cluster.sbatch("--array=0", *SMALL, str(SCRIPT), *args, env=job_env, cwd=tmp_path)
    wait_for_checkpoint(slurm_cluster, job, study_dir)
    slurm_cluster.run("scontrol", "requeue", f"{job}_0")
    requeued = time.monotonic()
    # SLURM holds a requeued batch job back (BeginTime about 2 minutes on); a test need not wait for that.
    assert wait_until(
        lambda: any(j["JobState"] == "PENDING" for j in slurm_cluster.job_states(job).values()), 60
    )
    slurm_cluster.run("scontrol", "update", f"JobId={job}_0", "StartTime=now")
    states = slurm_cluster.wait_done(job, JOB_TIMEOUT)
    (log,) = task_logs(tmp_path).values()
    (state,) = states.values()
    assert state["JobState"] == "COMPLETED" and state["Restarts"] == "1", (state, log)
    assert "start 1," in log and "start 2," in log, log  # one log, both starts (--open-mode=append)
    assert "stopped by SIGTERM: its runs were handed back" in log, log
    assert "Traceback" not in log, log
    assert_one_run_complete_once(study_dir, postgres_url)
    assert_resumed_from_checkpoint(study_dir)
    print(f"requeue: {requeued - started:.1f}s to checkpoint, {time.monotonic() - requeued:.1f}s after")
    assert_nothing_left(slurm_cluster)


@pytest.mark.slow
def test_sigterm_to_the_batch_step_exits_143_and_the_next_task_resumes(
    slurm_cluster, job_env, postgres_url, tmp_path
):
    """`scancel --signal=TERM --batch` is what `--signal=B:TERM@N` sends at the time limit."""
    started = time.monotonic()
    study_dir = tmp_path / "slurm"
    args = overrides(*ONE_RUN)
    job = slurm_cluster.sbatch("--array=0", *SMALL, str(SCRIPT), *args, env=job_env, cwd=tmp_path)
    wait_for_checkpoint(slurm_cluster, job, study_dir)
    slurm_cluster.run("scancel", "--signal=TERM", "--batch", f"{job}_0")
    (state,) = slurm_cluster.wait_done(job, JOB_TIMEOUT).values()
    (log,) = task_logs(tmp_path).values()
    assert state["JobState"] == "FAILED" and state["ExitCode"] == "143:0", (state, log)
    assert "stopped by SIGTERM: its runs were handed back" in log and "Traceback" not in log, log
    assert_nothing_left(slurm_cluster)
    stopped = time.monotonic()
    nxt = slurm_cluster.sbatch("--array=1", *SMALL, str(SCRIPT), *args, env=job_env, cwd=tmp_path)
    (state,) = slurm_cluster.wait_done(nxt, JOB_TIMEOUT).values()
    assert state["JobState"] == "COMPLETED", (state, task_logs(tmp_path))
    assert_one_run_complete_once(study_dir, postgres_url)
    assert_resumed_from_checkpoint(study_dir)
    print(
        f"scancel TERM: {stopped - started:.1f}s to stop, {time.monotonic() - stopped:.1f}s for the next task"
    )
    assert_nothing_left(slurm_cluster)


@pytest.mark.slow
def test_submit_sizes_the_array_from_the_plan_and_prints_the_watch_command(slurm_cluster, job_env, tmp_path):
    """`python -m sdsweep.submit` as a user types it; a 2-point grid (2 runs) with one task too many."""
    started = time.monotonic()
    small_grid = overrides("sweep.steps=[2]")
    command = [sys.executable, "-m", "sdsweep.submit", "--tasks", "3", *SMALL, "--", *small_grid]
    done = subprocess.run(command, capture_output=True, text=True, env=job_env, cwd=tmp_path, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "2 training run(s)" in done.stdout and "--tasks 3 is more than the 2 the plan needs" in done.stdout
    job = re.search(r"submitted job (\d+)", done.stdout).group(1)
    assert f"squeue -j {job}" in done.stdout and f"{tmp_path}/slurm/results.csv" in done.stdout, done.stdout
    states = slurm_cluster.wait_done(job, JOB_TIMEOUT)
    assert {j["JobState"] for j in states.values()} == {"COMPLETED"}, (states, task_logs(tmp_path))
    results = pd.read_csv(tmp_path / "slurm" / "results.csv")
    assert len(results) == 2 and (results["state"] == "COMPLETE").all(), results
    print(f"submit --tasks 3 of a 2-run grid: {time.monotonic() - started:.1f}s")
    assert_nothing_left(slurm_cluster)


def test_submit_refuses_without_shared_storage(slurm_cluster, tmp_path):
    env = slurm_cluster.env(PYTHONPATH=str(REPO))
    env.pop("SDSWEEP_STORAGE", None)
    command = [sys.executable, "-m", "sdsweep.submit", "--tasks", "2", "--", *overrides()]
    done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert done.returncode == 2 and "SDSWEEP_STORAGE is not set" in done.stderr, done.stdout + done.stderr
    assert not (tmp_path / "logs").exists()


def test_workers_auto_uses_the_slurm_allocation_not_the_node(monkeypatch):
    """Inside a SLURM job the allocation caps cores and GPUs; outside one nothing changes."""
    from sdsweep.sweep import allocation
    from sdsweep.sweep.pool import cpu_threads_per_worker

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    for name in ("SLURM_JOB_ID", "SLURM_CPUS_PER_TASK", "SLURM_CPUS_ON_NODE", "SLURM_GPUS_ON_NODE"):
        monkeypatch.delenv(name, raising=False)
    node = allocation.affinity_cores()
    assert allocation.allocated_cores() == node and allocation.allocated_gpu_count(4) == 4
    monkeypatch.setenv("SLURM_JOB_ID", "7")
    monkeypatch.setenv("SLURM_CPUS_ON_NODE", "1")
    assert allocation.allocated_cores() == 1 and cpu_threads_per_worker(1) == 1
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "1")
    assert cpu_threads_per_worker(1) == 1
    monkeypatch.setenv("SLURM_GPUS_ON_NODE", "2")
    assert allocation.allocated_gpu_count(8) == 2  # no CUDA_VISIBLE_DEVICES: SLURM's count caps it
    monkeypatch.setenv("SLURM_GPUS_ON_NODE", "0")
    assert allocation.allocated_gpu_count(8) == 0
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    assert allocation.allocated_gpu_count(2) == 2  # torch already sees only SLURM's devices


def test_submit_sizes_by_gpus_per_task():
    from sdsweep.sweep.submit import gpus_per_task, size

    assert gpus_per_task([]) == 4  # the script's #SBATCH line
    assert gpus_per_task(["--gpus-per-task=1"]) == 1 and gpus_per_task(["--gpus-per-task", "2"]) == 2
    grid = overrides()  # 2 learning rates x 2 step counts: 2 runs with milestone sharing
    assert (size(grid, ["--gpus-per-task=0"]).runs, size(grid, ["--gpus-per-task=0"]).needed) == (2, 2)
    assert size(grid, ["--gpus-per-task=2"]).needed == 1


@pytest.mark.slow
def test_the_time_limit_signal_reaches_sdsweep_through_the_script(slurm_cluster, job_env, tmp_path):
    """`--signal=B:TERM@90` with `--time=3`: SIGTERM comes 30-90 s in (SLURM checks about once a minute,
    so it may come up to 60 s early: with `--time=2` it once came 2 s in, before Python ran), to the batch
    step, which is sdsweep itself (`exec`); it hands its run back and the task exits 143 before the limit."""
    started = time.monotonic()
    # Far more steps than any machine trains in 3 minutes (400 once finished in 30 s on a faster CI
    # machine, before the signal): the run is still training whenever the signal comes.
    long_grid = overrides("sweep.steps=[2,1000000]")
    options = ["--cpus-per-task=1", "--gpus-per-task=0", "--time=3", "--signal=B:TERM@90"]
    job = slurm_cluster.sbatch("--array=0", *options, str(SCRIPT), *long_grid, env=job_env, cwd=tmp_path)
    (state,) = slurm_cluster.wait_done(job, 240).values()
    (log,) = task_logs(tmp_path).values()
    assert state["JobState"] == "FAILED" and state["ExitCode"] == "143:0", (state, log)
    assert "stopped by SIGTERM: its runs were handed back" in log and "Traceback" not in log, log
    print(f"time limit: SIGTERM handled, job over after {time.monotonic() - started:.1f}s")
    assert_nothing_left(slurm_cluster)
