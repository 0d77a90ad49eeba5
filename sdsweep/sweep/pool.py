"""The worker pool of one machine: ``sweep.workers`` long-lived processes, one per device slot.

Each worker (``python -m sdsweep.sweep.worker``) imports torch once and runs claim -> run -> claim until
the study needs nothing more (sdsweep/sweep/engine.py, SweepEngine.work). The driver only watches: it
echoes the workers' ``[sdsweep]`` lines, keeps everything else in ``runs/worker-<host>-<driver pid>-<n>.log``, and when
a worker dies it fails that worker's running trials with a readable reason (the retry rule is in
sdsweep/sweep/claims.py) and starts a replacement. Workers get SIGTERM when the driver dies, even by
SIGKILL (PR_SET_PDEATHSIG, plus a parent check), so no orphan keeps a GPU busy.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from sdsweep import io, signals
from sdsweep.errors import SweepStopped
from sdsweep.exits import BASELINE_FAILED, ERROR_LINE, STUDY_CHANGED
from sdsweep.study.trial_tags import Fate, TrialTags
from sdsweep.sweep import allocation

_HOST = re.sub(r"[^A-Za-z0-9_.-]+", "_", socket.gethostname()) or "host"
STOP_WAIT_SECONDS = 60  # how long a stopping worker may take to hand its run back before SIGKILL


def worker_devices(workers, devices: list[int] | None, per_worker: int = 1) -> list[str | None]:
    """CUDA_VISIBLE_DEVICES for each worker (None: leave it alone, e.g. on CPU); with
    ``per_worker`` > 1 (train.num_processes) each worker gets that many devices, e.g. "0,1"."""
    import torch

    visible = allocation.allocated_gpu_count(torch.cuda.device_count() if torch.cuda.is_available() else 0)
    chosen = list(devices) if devices is not None else list(range(visible))
    count = max(1, len(chosen) // per_worker) if workers == "auto" else int(workers)
    # Indices count within the devices this process may see (SLURM sets CUDA_VISIBLE_DEVICES).
    inherited = [d for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    physical = [inherited[d] if d < len(inherited) else str(d) for d in chosen]
    if not physical:
        return [None] * count
    return [
        ",".join(physical[(i * per_worker + k) % len(physical)] for k in range(per_worker))
        for i in range(count)
    ]


def cpu_cores() -> int:
    return allocation.allocated_cores()  # under SLURM: SLURM_CPUS_PER_TASK, not the node's cores


def cpu_threads_per_worker(workers: int) -> int:
    """Torch threads for each of ``workers`` CPU workers: the cores split between them, at most the
    OMP_NUM_THREADS the user exported (the usual knob; e.g. 1 on a machine shared with other jobs,
    where a process with more threads than it gets cores waits on its own stalled threads)."""
    threads = max(1, cpu_cores() // workers)
    exported = os.environ.get("OMP_NUM_THREADS", "").strip()
    if exported.isdigit() and int(exported) > 0:
        threads = min(threads, int(exported))
    return threads


PRELOAD = "sdsweep.sweep.preload"  # what the fork server imports once for every worker


class ForkedWorker:
    """A worker forked from the fork server, behind the few ``subprocess.Popen`` methods the pool uses."""

    def __init__(self, process, stdout):
        self.process = process
        self.pid = process.pid
        self.stdout = stdout

    def poll(self) -> int | None:
        return self.process.exitcode

    def wait(self, timeout: float | None = None) -> int:
        self.process.join(timeout)
        if self.process.exitcode is None:
            raise subprocess.TimeoutExpired(f"worker {self.pid}", timeout)
        return self.process.exitcode

    def send_signal(self, signum: int) -> None:
        if self.process.exitcode is None:
            os.kill(self.pid, signum)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


class WorkerStarter:
    """Starts workers. On Linux they are forked from a fork server that imported torch, diffusers and
    transformers once per driver (sdsweep/sweep/preload.py), so a worker, or its replacement after a
    crash, starts in a fraction of a second instead of paying the ~5 s of imports of a fresh interpreter.
    A worker is still its own process: a crash or an out-of-memory kill ends only that worker. Where the
    fork server is not available (or SDSWEEP_WORKER_START=spawn), each worker is a fresh interpreter."""

    def __init__(self):
        import multiprocessing

        self.context = None
        if os.environ.get("SDSWEEP_WORKER_START", "forkserver") == "forkserver":
            try:
                self.context = multiprocessing.get_context("forkserver")
            except ValueError:
                self.context = None

    def warm_up(self) -> None:
        """Start the fork server now (its imports then overlap the driver's own work)."""
        if self.context is not None:
            from multiprocessing import forkserver

            self.context.set_forkserver_preload([PRELOAD])
            forkserver.ensure_running()

    def start(self, job: str, label: str, token: str, env: dict[str, str]):
        if self.context is not None:
            try:
                return self._fork(job, label, token, env)
            except (OSError, EOFError, RuntimeError) as error:
                print(f"[sdsweep] the fork server failed ({error}); starting workers as fresh interpreters")
                self.context = None
        return subprocess.Popen(
            [sys.executable, "-m", "sdsweep.sweep.worker", job, label, token],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=env,
            text=True,
            errors="replace",
            preexec_fn=signals.die_with_parent,
        )

    def _fork(self, job: str, label: str, token: str, env: dict[str, str]) -> ForkedWorker:
        from sdsweep.sweep.worker import forked_main

        self.warm_up()
        reader, writer = self.context.Pipe(duplex=False)
        process = self.context.Process(
            target=forked_main, args=(job, label, token, env, writer), name=label, daemon=False
        )
        process.start()
        writer.close()  # the worker holds the only write end: its exit is our end of file
        stdout = os.fdopen(os.dup(reader.fileno()), "r", encoding="utf-8", errors="replace")
        reader.close()
        return ForkedWorker(process, stdout)


@dataclass
class Worker:
    index: int
    device: str | None
    token: str
    proc: ForkedWorker | subprocess.Popen
    log_path: Path
    reader: threading.Thread
    error_lines: list[str] = field(default_factory=list)
    stop_reason: str | None = None  # why the worker stopped the sweep ("[sdsweep] ...: stopping: <why>")

    @property
    def name(self) -> str:
        return f"worker {self.index}" + (f" (cuda:{self.device})" if self.device is not None else "")


class WorkerPool:
    def __init__(self, engine):
        self.engine = engine
        self.sweep = engine.sweep
        self.starter = WorkerStarter()
        self.starter.warm_up()  # the fork server imports while we set up
        self.devices = worker_devices(self.sweep.workers, self.sweep.devices, engine.cfg.train.num_processes)
        cpu_only = all(d is None for d in self.devices)
        self.threads = cpu_threads_per_worker(len(self.devices)) if cpu_only else None
        self.workers: list[Worker] = []
        self.tokens: list[str] = []
        # Set by a worker's output reader at EOF (the worker exited): the watch loop wakes at once instead of
        # polling, and otherwise sleeps, so the driver costs no CPU while workers train.
        self.exited = threading.Event()
        self.spawned = 0
        self.paths = engine.paths
        self.paths.runs.mkdir(parents=True, exist_ok=True)
        self.job = io.atomic_write_text(
            self.paths.runs / f"pool-{engine.token}.json",
            json.dumps(
                {
                    "overrides": engine.overrides,
                    "config": engine.config_yaml,  # built once by the driver: workers never compose it
                    "retry_below": engine.retry_below,
                    "started_at": engine.started_at,
                }
            ),
        )

    def spawn(self, index: int) -> Worker:
        self.spawned += 1
        device = self.devices[index]
        token = f"{self.engine.token}.{index}.{self.spawned}"
        self.tokens.append(token)
        # One log per driver and slot: drivers on other machines, or a second driver here, share runs/ and
        # number their workers from 0 too, so host and driver PID are in the name and the header (#32).
        log_path = self.paths.runs / f"worker-{_HOST}-{os.getpid()}-{index}.log"
        env = {
            **os.environ,
            "PYTHONUNBUFFERED": "1",
            "SDSWEEP_DRIVER_PID": str(os.getpid()),
            "SDSWEEP_WORKER_LOG": str(log_path),  # where its output goes if the driver dies
        }
        if device is not None:
            env["CUDA_VISIBLE_DEVICES"] = device
        if self.threads is not None:
            env["SDSWEEP_TORCH_THREADS"] = env["OMP_NUM_THREADS"] = str(self.threads)
        label = f"worker {index}" + (f" (cuda:{device})" if device is not None else "")
        self.paths.runs.mkdir(parents=True, exist_ok=True)
        with open(log_path, "a", encoding="utf-8") as log_file:
            log_file.write(
                f"# sdsweep {label}, driver pid {os.getpid()} on {socket.gethostname()}, study "
                f"{self.engine.cfg.study}, "
                f"started {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())} (worker token {token})\n"
            )
        proc = self.starter.start(str(self.job), label, token, env)
        worker = Worker(index, device, token, proc, log_path, threading.Thread())
        worker.reader = threading.Thread(target=self._pump, args=(worker,), daemon=True)
        worker.reader.start()
        return worker

    def _pump(self, worker: Worker) -> None:
        """Echo the worker's own status lines; keep all output in its log file and remember errors."""
        assert worker.proc.stdout is not None
        with open(worker.log_path, "a", encoding="utf-8") as log_file:
            for line in worker.proc.stdout:
                log_file.write(line)
                log_file.flush()
                if line.startswith("[sdsweep]"):
                    if ": stopping: " in line:
                        worker.stop_reason = line.split(": stopping: ", 1)[1].strip()
                    else:
                        print(line, end="", flush=True)
                stripped = line.strip()
                if ERROR_LINE.match(stripped) or "out of memory" in stripped.lower():
                    worker.error_lines = (worker.error_lines + [stripped])[-5:]
        worker.proc.wait()  # EOF comes just before the exit status: wake the watch loop once it is there
        self.exited.set()

    def crash_reason(self, worker: Worker, code: int) -> str:
        if code < 0:
            name = signal.Signals(-code).name
            hint = " (the kernel's out-of-memory killer?)" if -code == signal.SIGKILL else ""
            why = f"killed by {name}{hint}"
        else:
            oom = [line for line in worker.error_lines if "out of memory" in line.lower()]
            last = (oom or worker.error_lines or [f"exit code {code}"])[-1]
            why = f"crashed: {last[:500]}"
        return f"{worker.name} {why}; full log: {worker.log_path}"

    def run(self) -> None:
        n = len(self.devices)
        where = (
            ", ".join(f"cuda:{d}" for d in self.devices if d is not None)
            or f"CPU, {self.threads} thread(s) each"
        )
        self.engine.say(f"starting {n} worker(s) on {where}")
        self.workers = [self.spawn(i) for i in range(n)]
        # Enough replacements for every point's retries, without looping forever on a broken setup.
        budget = n * (self.sweep.max_retries + 2) + 4
        try:
            while self.workers:
                self.exited.clear()
                for worker in list(self.workers):
                    code = worker.proc.poll()
                    if code is None:
                        continue
                    worker.reader.join(timeout=5)
                    self.workers.remove(worker)
                    if code == 0:
                        continue
                    if code in (BASELINE_FAILED, STUDY_CHANGED):
                        self.stop(signal.SIGTERM)
                        why = worker.stop_reason or "the baseline evaluation failed"
                        raise SweepStopped(
                            f"{worker.name}: {why} (full log: {worker.log_path})",
                            exit_code=2 if code == STUDY_CHANGED else 1,
                        )
                    reason = self.crash_reason(worker, code)
                    failed = [t for t in self.engine.claims.running_of_token(worker.token)]
                    for frozen in failed:
                        self.engine.claims.crashed(frozen, reason)
                    self.engine.say(f"{reason}; {len(failed)} trial(s) failed, replacing the worker")
                    self.engine.nudge()  # idle peers re-plan now: the failed run may be retried
                    if self.spawned < budget:
                        self.workers.append(self.spawn(worker.index))
                if self.workers:
                    self.exited.wait(timeout=1.0)  # the timeout only bounds a missed wake-up
        except signals.HandBack as stop:
            self.engine.say(
                f"{stop} received: stopping the workers (their runs are handed back; at most {STOP_WAIT_SECONDS} s)"
            )
            with signals.critical():  # a second Ctrl-C waits for this, rather than leave runs unreturned
                self.stop(stop.signum)
            raise

    def stop(self, signum: int) -> None:
        """Ask every worker to hand its run back, wait, then make sure none is left."""
        for worker in self.workers:
            if worker.proc.poll() is None:
                worker.proc.send_signal(signal.SIGTERM if signum != signal.SIGINT else signal.SIGINT)
        deadline = time.monotonic() + STOP_WAIT_SECONDS
        for worker in self.workers:
            try:
                worker.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                worker.proc.kill()
                worker.proc.wait()
            worker.reader.join(timeout=5)
        for worker in self.workers:  # a worker killed before it could hand back
            left = [t.number for t in self.engine.claims.running_of_token(worker.token)]
            self.engine.claims.hand_back(left, "the sweep was stopped")
        self.workers = []

    def launched(self) -> tuple[int, int]:
        """(runs, trials) this driver's workers trained, from the storage."""
        runs = trials = 0
        tokens = set(self.tokens)
        for frozen in self.engine.handle.trials():
            tags = TrialTags.of(frozen)
            if tags.token not in tokens:
                continue
            if tags.fate == Fate.CLAIM_LOST:
                continue  # a lost claim race: nothing was trained
            trials += 1
            runs += tags.ticket
        return runs, trials
