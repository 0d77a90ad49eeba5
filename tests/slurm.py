"""A throwaway one-node SLURM cluster for tests: Debian's slurm-wlm and munge, a generated slurm.conf in a
temp dir, slurmctld and slurmd on this host (the recipe is in tests/SLURM.md).

SLURM's daemons run as root here (SlurmUser=root), so the cluster needs root; munge authenticates the
commands. Everything the cluster writes (state, spool, logs, pid files) stays in its temp dir, and the
commands find the cluster through ``SLURM_CONF``, which ``env()`` adds.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

INSTALL_HINT = "install Debian's SLURM with `apt-get install -y slurm-wlm munge` (or `make browser`)"
COMMANDS = (
    "slurmctld",
    "slurmd",
    "munged",
    "munge",
    "unmunge",
    "sbatch",
    "squeue",
    "scontrol",
    "sinfo",
    "scancel",
)
MUNGE_DIRS = ("/etc/munge", "/var/run/munge", "/var/log/munge", "/var/lib/munge")


def missing_reason() -> str | None:
    """Why a SLURM test cannot run here (with the fix), or None when it can."""
    absent = [c for c in COMMANDS if shutil.which(c) is None]
    if absent:
        return f"{', '.join(absent)} not found: {INSTALL_HINT}"
    if os.geteuid() != 0:
        return "the one-node SLURM cluster runs its daemons as root (SlurmUser=root): run the tests as root"
    return None


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def munge_works() -> bool:
    try:
        cred = subprocess.run(["munge", "-n"], capture_output=True, timeout=10)
        if cred.returncode != 0:
            return False
        check = subprocess.run(["unmunge"], input=cred.stdout, capture_output=True, timeout=10)
        return check.returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def start_munged() -> int | None:
    """Start munged (as the munge user) unless one already answers; returns the PID we started, or None."""
    if munge_works():
        return None
    key = Path("/etc/munge/munge.key")
    for folder in MUNGE_DIRS:
        Path(folder).mkdir(parents=True, exist_ok=True)
        shutil.chown(folder, user="munge", group="munge")
    os.chmod("/etc/munge", 0o700)
    if not key.exists():
        key.write_bytes(os.urandom(1024))
    shutil.chown(key, user="munge", group="munge")
    os.chmod(key, 0o400)
    pid_file = Path("/var/run/munge/munged.pid")
    subprocess.run(["runuser", "-u", "munge", "--", "/usr/sbin/munged"], check=True, timeout=30)
    deadline = time.monotonic() + 20
    while not munge_works():
        if time.monotonic() > deadline:
            raise RuntimeError("munged started but `munge -n | unmunge` still fails (see /var/log/munge)")
        time.sleep(0.2)
    return int(pid_file.read_text().strip()) if pid_file.exists() else None


@dataclass
class SlurmCluster:
    """One running cluster: ``env()`` is the environment for sbatch/squeue/scontrol."""

    root: Path
    host: str
    cpus: int
    munged_pid: int | None = None
    daemons: dict[str, int] = field(default_factory=dict)  # name -> PID, read once they are up

    @property
    def conf(self) -> Path:
        return self.root / "slurm.conf"

    def env(self, **extra: str) -> dict[str, str]:
        return {**os.environ, "SLURM_CONF": str(self.conf), **extra}

    def run(self, *argv: str, check: bool = True, timeout: float = 30, env: dict | None = None, cwd=None):
        proc = subprocess.run(
            list(argv), capture_output=True, text=True, timeout=timeout, env=env or self.env(), cwd=cwd
        )
        if check and proc.returncode != 0:
            raise RuntimeError(
                f"{' '.join(argv)} failed (exit {proc.returncode}):\n{proc.stdout}{proc.stderr}"
            )
        return proc

    @classmethod
    def start(cls) -> SlurmCluster:
        root = Path(tempfile.mkdtemp(prefix="sdsweep-slurm-"))
        host = socket.gethostname().split(".")[0]
        cluster = cls(root=root, host=host, cpus=os.cpu_count() or 1)
        try:
            cluster.munged_pid = start_munged()
            cluster.write_conf()
            for daemon in ("slurmctld", "slurmd"):
                cluster.run(f"/usr/sbin/{daemon}", "-f", str(cluster.conf))
                pid = _read_pid(root / f"{daemon}.pid")
                if pid:
                    cluster.daemons[daemon] = pid
            cluster.wait_idle()
        except BaseException:
            cluster.stop()
            raise
        return cluster

    def write_conf(self) -> None:
        for sub in ("state", "spool"):
            (self.root / sub).mkdir()
        memory = 1024
        try:
            with open("/proc/meminfo") as meminfo:
                total_kib = int(next(line for line in meminfo if line.startswith("MemTotal")).split()[1])
            memory = max(512, total_kib // 1024 - 1024)
        except (OSError, StopIteration, ValueError):
            pass
        r = self.root
        lines = [
            "ClusterName=sdsweeptest",
            f"SlurmctldHost={self.host}",
            "SlurmUser=root",
            "SlurmdUser=root",
            "AuthType=auth/munge",
            f"SlurmctldPort={free_port()}",
            f"SlurmdPort={free_port()}",
            f"StateSaveLocation={r / 'state'}",
            f"SlurmdSpoolDir={r / 'spool'}",
            f"SlurmctldPidFile={r / 'slurmctld.pid'}",
            f"SlurmdPidFile={r / 'slurmd.pid'}",
            f"SlurmctldLogFile={r / 'slurmctld.log'}",
            f"SlurmdLogFile={r / 'slurmd.log'}",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core",
            "ReturnToService=2",
            "MpiDefault=none",
            "SchedulerType=sched/backfill",
            "JobRequeue=1",
            # Short clocks so tests see limits within seconds: SIGKILL 20 s after SIGTERM (time for a hand
            # back), no grace past the time limit, finished jobs kept 5 minutes for `scontrol show job`.
            "KillWait=20",
            "OverTimeLimit=0",
            "MinJobAge=300",
            "InactiveLimit=0",
            "SlurmctldTimeout=30",
            "SlurmdTimeout=30",
            "MessageTimeout=20",
            f"NodeName={self.host} CPUs={self.cpus} RealMemory={memory} State=UNKNOWN",
            f"PartitionName=debug Nodes={self.host} Default=YES MaxTime=INFINITE State=UP",
        ]
        self.conf.write_text("\n".join(lines) + "\n")

    def wait_idle(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        state = ""
        while time.monotonic() < deadline:
            proc = self.run("sinfo", "-h", "-o", "%t", check=False)
            state = proc.stdout.strip()
            if state == "idle":
                return
            time.sleep(0.5)
        raise RuntimeError(
            f"the SLURM node is not idle after {timeout:.0f}s (sinfo: {state!r}){self.log_tail()}"
        )

    def ctld_log(self) -> str:
        path = self.root / "slurmctld.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def log_tail(self) -> str:
        parts = []
        for name in ("slurmctld.log", "slurmd.log"):
            path = self.root / name
            if path.exists():
                parts.append(f"\n--- {name}\n" + path.read_text(errors="replace")[-3000:])
        return "".join(parts)

    # ---- jobs ---------------------------------------------------------------------------------------
    def sbatch(self, *argv: str, env: dict | None = None, cwd=None) -> str:
        """Submit; returns the job id (``--parsable``)."""
        proc = self.run("sbatch", "--parsable", *argv, env=env, cwd=cwd)
        return proc.stdout.strip().split(";")[0]

    def job_states(self, job_id: str) -> dict[str, dict[str, str]]:
        """``scontrol show job`` for every task of a job: {JobId: {key: value}} (finished jobs included)."""
        proc = self.run("scontrol", "-o", "show", "job", job_id, check=False)
        jobs = {}
        for line in proc.stdout.splitlines():
            fields = dict(part.split("=", 1) for part in line.split() if "=" in part)
            if "JobId" in fields:
                jobs[fields["JobId"]] = fields
        return jobs

    def wait_done(self, job_id: str, timeout: float) -> dict[str, dict[str, str]]:
        """Wait until no task of the job is pending or running; returns their final states."""
        deadline = time.monotonic() + timeout
        while True:
            jobs = self.job_states(job_id)
            if jobs and all(
                j.get("JobState")
                not in ("PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "REQUEUED", "SUSPENDED")
                for j in jobs.values()
            ):
                return jobs
            if time.monotonic() > deadline:
                self.run("scancel", job_id, check=False)
                raise AssertionError(f"job {job_id} not done after {timeout:.0f}s: {jobs}{self.log_tail()}")
            time.sleep(1)

    def job_processes(self) -> list[str]:
        """Every process still running for a job of this cluster: slurmstepd and whatever carries this
        cluster's SLURM_CONF in its environment (the tasks inherit it from sbatch), workers included."""
        import psutil

        left = []
        for proc in psutil.process_iter(["pid", "name", "cmdline"]):
            try:
                if proc.info["name"] in ("slurmctld", "slurmd"):
                    continue  # the cluster itself (started with SLURM_CONF too)
                if proc.info["name"] == "slurmstepd" or proc.environ().get("SLURM_CONF") == str(self.conf):
                    if proc.pid != os.getpid() and proc.status() != psutil.STATUS_ZOMBIE:
                        left.append(f"{proc.pid} {' '.join(proc.info['cmdline'] or [])[:200]}")
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
        return left

    # ---- teardown ---------------------------------------------------------------------------------
    def stop(self) -> None:
        if self.conf.exists():
            try:
                self.run("scancel", "--user=root", check=False, timeout=10)
                self.run("scontrol", "shutdown", check=False, timeout=20)
            except (OSError, subprocess.TimeoutExpired):
                pass
        deadline = time.monotonic() + 15
        pids = {**{d: _read_pid(self.root / f"{d}.pid") for d in ("slurmctld", "slurmd")}, **self.daemons}
        for pid in pids.values():
            while pid and _alive(pid) and time.monotonic() < deadline:
                time.sleep(0.2)
            if pid and _alive(pid):
                os.kill(pid, signal.SIGKILL)
        if self.munged_pid and _alive(self.munged_pid):
            os.kill(self.munged_pid, signal.SIGTERM)
        shutil.rmtree(self.root, ignore_errors=True)


def _read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
