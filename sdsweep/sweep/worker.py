"""``python -m sdsweep.sweep.worker <pool.json> <label> <token>``: one long-lived worker of the pool.

It imports torch once, evaluates the baseline if nobody has, then claims and trains runs until the
study needs nothing more (SweepEngine.work). A crash, a segfault or an out-of-memory kill ends only
this process: the driver fails its running trials with the reason and starts a replacement.
SIGINT/SIGTERM (also sent when the driver dies) hand the current run back and exit.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
from pathlib import Path

from sdsweep import signals
from sdsweep.errors import ConfigError
from sdsweep.exits import BASELINE_FAILED, STUDY_CHANGED  # a leaf module: start-up stays small


class DriverPipe:
    """The worker's stdout/stderr: a pipe to the driver, which echoes and logs it.

    When the driver dies (kill -9), the next write fails with EPIPE. Raised where it happens (a progress
    bar inside an evaluation, a log line inside a save) it would fail a trial that did nothing wrong. So
    the write is swallowed, further output goes to the worker's log file, and the worker stops itself
    with SIGTERM: it hands its run back, exactly as when the parent-death signal arrives."""

    def __init__(self, stream, log_path: str | None):
        self.stream = stream
        self.log_path = log_path
        self.broken = False

    def write(self, text: str) -> int:
        try:
            return self.stream.write(text)
        except (BrokenPipeError, OSError):
            self._driver_gone()
            return len(text)

    def flush(self) -> None:
        try:
            self.stream.flush()
        except (BrokenPipeError, OSError):
            self._driver_gone()

    def _driver_gone(self) -> None:
        if self.broken:
            return
        self.broken = True
        target = os.open(self.log_path or os.devnull, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
        for fd in (1, 2):  # C-level writes (library warnings) go there too, not into a dead pipe
            os.dup2(target, fd)
        os.close(target)
        self.stream = open(1, "w", encoding="utf-8", errors="replace", closefd=False, buffering=1)
        os.kill(os.getpid(), signal.SIGTERM)  # -> HandBack in the main thread: the run is handed back

    def __getattr__(self, name):  # isatty, fileno, encoding, ... of the underlying stream
        return getattr(self.stream, name)


def guard_output() -> None:
    """Route this worker's stdout and stderr through ``DriverPipe``."""
    log_path = os.environ.get("SDSWEEP_WORKER_LOG")
    sys.stdout = DriverPipe(sys.stdout, log_path)
    sys.stderr = DriverPipe(sys.stderr, log_path)


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 3:
        print("usage: python -m sdsweep.sweep.worker <pool.json> <label> <token>", file=sys.stderr)
        return 2
    job, label, token = json.loads(Path(args[0]).read_text()), args[1], args[2]
    signals.install()
    guard_output()
    driver = os.environ.get("SDSWEEP_DRIVER_PID")
    # Fallback for PR_SET_PDEATHSIG (set by the pool when it started us), and a watch on the driver itself.
    signals.watch_parent(driver_pid=int(driver) if driver else None)
    try:
        import torch

        from sdsweep import progress, warnings_filter

        warnings_filter.install()  # no torchvision advice: sdsweep runs without it on purpose
        progress.quiet_library_bars()
        threads = os.environ.get("SDSWEEP_TORCH_THREADS")
        if threads:
            torch.set_num_threads(int(threads))  # N workers on one CPU split its cores

        import gc

        from sdsweep.config.load import config_from_yaml
        from sdsweep.sweep.engine import SweepEngine

        gc.freeze()  # as the fork server does (preload.py): collections scan only what runs allocate

        engine = SweepEngine(
            job["overrides"],
            config_from_yaml(job["config"]),
            label=label,
            token=token,
            retry_below=job.get("retry_below"),
            started_at=job.get("started_at"),
        )
        try:
            engine.ensure_baseline()
        except signals.HandBack:
            raise
        except Exception as error:
            print(
                f"[sdsweep] {label}: stopping: the baseline evaluation failed: {type(error).__name__}: {error}",
                flush=True,
            )
            return BASELINE_FAILED
        try:
            engine.work()
        except ConfigError as error:  # the study changed under the sweep (fingerprint.check_study_unchanged)
            print(f"[sdsweep] {label}: stopping: {error}", flush=True)
            return STUDY_CHANGED
    except signals.HandBack:
        return 0  # the run was handed back in SweepEngine.run_one; the driver prints the one line
    return 0


def forked_main(job_path: str, label: str, token: str, env: dict[str, str], output) -> None:
    """The worker's start in a child of the pool's fork server (sdsweep/sweep/pool.py), which imported
    torch, diffusers and transformers once: the same ``main`` as ``python -m sdsweep.sweep.worker``,
    minus the ~5 s of library imports a fresh interpreter pays."""
    from multiprocessing import forkserver

    # The fork server hands every child the driver's end of its "driver alive" pipe; while a worker holds
    # it, the fork server never sees the driver die, never exits, and the parent-death signal below never
    # comes. We watch the fork server instead, so let go of that end.
    server = getattr(forkserver, "_forkserver", None)
    alive = getattr(server, "_forkserver_alive_fd", None)
    if alive is not None:
        try:
            os.close(alive)
        except OSError:
            pass
        server._forkserver_alive_fd = None
    signals.die_with_parent()  # our parent is the fork server, which exits when the driver does
    fd = output.fileno()
    os.dup2(fd, 1)  # everything the worker prints goes to the driver's pipe, as with a subprocess
    os.dup2(fd, 2)
    output.close()
    sys.stdout.reconfigure(line_buffering=True)
    sys.stderr.reconfigure(line_buffering=True)
    # The driver's environment now, not the fork server's at its start (devices, threads, test switches).
    os.environ.clear()
    os.environ.update(env)
    _thread_locks_for_progress_bars()
    exit_now(main([job_path, label, token]))


def _thread_locks_for_progress_bars() -> None:
    """tqdm guards its bars with a multiprocessing lock: a named semaphore registered with the driver's
    resource tracker, which a worker leaving through ``os._exit`` never unregisters (the driver then warns
    about "leaked semaphore objects"). One process needs only a thread lock."""
    import threading

    from tqdm import tqdm

    tqdm.set_lock(threading.RLock())


def exit_now(code: int) -> None:
    """Leave without the interpreter's teardown (~1 s of freeing torch and library state on 2 cores, paid
    while the driver waits): every result is already in the storage and on disk; flush what is left."""
    wandb = sys.modules.get("wandb")
    if wandb is not None and getattr(wandb, "run", None) is not None:
        wandb.finish()  # a tracking run still open is closed properly
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    exit_now(main())
