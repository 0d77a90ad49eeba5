"""Real ``python -m sdsweep`` driver processes for tests: start, signal, wait, and account for every PID.

Each driver starts in a new session, its output goes to a file (a pipe nobody reads would block it), and
a watcher thread records every descendant it ever sees (workers included), so a test can check that
nothing it started outlives the test, even workers whose parent was SIGKILLed and which were reparented.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]


def wait_until(predicate, timeout: float, interval: float = 0.2) -> bool:
    """Poll ``predicate`` until it is true or ``timeout`` seconds passed; returns its last value."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return bool(predicate())


@dataclass
class Driver:
    name: str
    proc: subprocess.Popen
    log_path: Path

    @property
    def pid(self) -> int:
        return self.proc.pid

    def output(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def alive(self) -> bool:
        return self.proc.poll() is None

    def send(self, sig: int) -> None:
        """A signal to the driver process alone (as `kill` does), not to its process group."""
        if self.alive():
            os.kill(self.pid, sig)

    def wait(self, timeout: float) -> int:
        """The exit code; a driver still running after ``timeout`` fails the test (after a kill)."""
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)
            raise AssertionError(
                f"driver {self.name} still running after {timeout:.0f}s; output:\n{self.output()[-4000:]}"
            ) from None


@dataclass
class DriverGroup:
    """Every driver a test started, and every process they spawned (PID + start time)."""

    log_dir: Path
    drivers: list[Driver] = field(default_factory=list)
    seen: dict[int, float] = field(default_factory=dict)  # pid -> create_time (guards PID reuse)
    _stop: threading.Event = field(default_factory=threading.Event)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _watcher: threading.Thread | None = None

    def start(
        self, overrides: list[str], name: str | None = None, env: dict[str, str] | None = None
    ) -> Driver:
        name = name or f"driver{len(self.drivers) + 1}"
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log_path = self.log_dir / f"{name}.log"
        # One torch thread per process: tests run several drivers (and their workers) side by side on a
        # few cores, where a process with more threads than free cores stalls on its own threads (on
        # 2 shared cores the tiny model trained 10x slower with 2 threads than with 1).
        environment = {
            **os.environ,
            "PYTHONUNBUFFERED": "1",
            "PYTHONPATH": str(REPO),
            "OMP_NUM_THREADS": "1",
            **(env or {}),
        }
        with open(log_path, "ab") as log_file:
            proc = subprocess.Popen(
                [sys.executable, "-m", "sdsweep", *overrides],
                cwd=REPO,
                env=environment,
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        driver = Driver(name, proc, log_path)
        with self._lock:
            self.drivers.append(driver)
            self._remember(proc.pid)
        if self._watcher is None:
            self._watcher = threading.Thread(target=self._watch, daemon=True)
            self._watcher.start()
        return driver

    def _remember(self, pid: int) -> None:
        try:
            self.seen.setdefault(pid, psutil.Process(pid).create_time())
        except psutil.Error:
            pass

    def _watch(self) -> None:
        while not self._stop.is_set():
            self.snapshot()
            self._stop.wait(0.25)

    def snapshot(self) -> None:
        """Record the current descendants of every live driver (children die or get reparented later)."""
        with self._lock:
            for driver in self.drivers:
                try:
                    children = psutil.Process(driver.pid).children(recursive=True)
                except psutil.Error:
                    continue
                for child in children:
                    self._remember(child.pid)

    def leftovers(self) -> list[psutil.Process]:
        """Processes this test started that still run (zombies, already dead, do not count)."""
        self.snapshot()
        sessions = {d.pid for d in self.drivers}
        alive: dict[int, psutil.Process] = {}
        with self._lock:
            known = dict(self.seen)
        for pid, created in known.items():
            try:
                process = psutil.Process(pid)
                if process.create_time() == created and process.status() != psutil.STATUS_ZOMBIE:
                    alive[pid] = process
            except psutil.Error:
                continue
        # Anything still in a driver's session, even if the watcher never saw it.
        for process in psutil.process_iter():
            try:
                if os.getsid(process.pid) in sessions and process.status() != psutil.STATUS_ZOMBIE:
                    alive.setdefault(process.pid, process)
            except (psutil.Error, OSError):
                continue
        return [p for pid, p in alive.items() if pid != os.getpid()]

    def assert_no_leftovers(self, timeout: float = 20.0) -> None:
        """Every process the test started exits by itself within ``timeout`` seconds."""
        for driver in self.drivers:
            driver.proc.poll()  # reap exited drivers so they are not counted as zombies
        if wait_until(lambda: not self.leftovers(), timeout, interval=0.5):
            return
        described = []
        for process in self.leftovers():
            try:
                described.append(f"{process.pid} {' '.join(process.cmdline())[:200]}")
            except psutil.Error:
                continue
        if described:
            raise AssertionError("processes outlived their sweep:\n" + "\n".join(described))

    def kill_all(self) -> None:
        """Teardown: SIGKILL everything still running (drivers, their groups, recorded descendants)."""
        self._stop.set()
        for driver in self.drivers:
            if driver.alive():
                try:
                    os.killpg(driver.pid, signal.SIGKILL)
                except OSError:
                    pass
        for process in self.leftovers():
            try:
                process.kill()
            except psutil.Error:
                pass
        for driver in self.drivers:
            try:
                driver.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pass
        if self._watcher is not None:
            self._watcher.join(timeout=5)

    def outputs(self) -> str:
        return "\n".join(
            f"==== {d.name} (exit {d.proc.poll()}) ====\n{d.output()[-6000:]}" for d in self.drivers
        )
