"""Data parallelism inside one run (``train.num_processes``): N ranks train one model together.

The run's own process (the in-process driver or a pool worker) is rank 0: it evaluates, writes
checkpoints, weights and metrics.json, and talks to Optuna and W&B. ``Ranks`` starts ranks 1..N-1 as
child processes (``python -m sdsweep.training.rank``) that only train. Every rank joins a torch.distributed
group through accelerate's own environment variables (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR,
MASTER_PORT): accelerate then picks MULTI_GPU (nccl) on CUDA, one device per rank (the rank's index
within CUDA_VISIBLE_DEVICES), or MULTI_CPU (gloo) on CPU, where the ranks split the cores.

Inside ``train()`` accelerate does the data parallelism: the trained modules are prepared into DDP
wrappers (``ddp_options``), so each bucket of gradients is all-reduced while backward still runs and
accumulation micro-steps skip it (``no_sync``), and the loader is prepared with ``split_batches``
(``rank_batches``). What is left here is starting, joining and watching the ranks, and ``agree``.

The children die with their parent (PR_SET_PDEATHSIG plus a parent check), and a rank that crashes
fails the run with that rank's error (rank 0's collective errors out when a gloo peer vanishes).
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

from sdsweep import io, signals
from sdsweep.config.load import to_yaml
from sdsweep.config.schema import Config
from sdsweep.errors import ConfigError
from sdsweep.exits import ERROR_LINE
from sdsweep.training.process_group import MASTER_ADDR, RankSpec, joined

CHILD_EXIT_SECONDS = 120  # how long rank 0 waits for the other ranks to leave after the last step
_RANK_PREFIX = re.compile(r"^\[rank\d+\]:")


class RankFailed(RuntimeError):
    """Another rank of this run crashed; the message is its reason."""


def visible_cuda_devices() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def check_devices(cfg: Config, device: torch.device) -> None:
    """ConfigError (before any model loads) when the ranks cannot each get their own GPU."""
    processes = cfg.train.num_processes
    if processes == 1 or device.type != "cuda":
        return  # on CPU the ranks share the cores
    workers = cfg.sweep.workers if cfg.sweep is not None else 1
    devices = cfg.sweep.devices if cfg.sweep is not None else None
    available = len(devices) if devices is not None else visible_cuda_devices()
    wanted = processes if workers == "auto" else processes * int(workers)
    if wanted > available:
        raise ConfigError(
            f"Invalid config value train.num_processes={processes}: with sweep.workers={workers} it needs "
            f"{wanted} GPUs (one per rank), but {available} are available. Lower train.num_processes or "
            "sweep.workers, or list more GPUs in sweep.devices."
        )


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((MASTER_ADDR, 0))
        return int(sock.getsockname()[1])


# ---- rank 0: start and watch the others --------------------------------------------------------------------
class Ranks:
    """Context manager on rank 0: starts ranks 1..N-1, joins the group, and on leaving waits for them
    (or, when this rank failed, stops them); a crashed rank's error becomes the run's error."""

    def __init__(
        self,
        cfg: Config,
        study_root: Path,
        log_dir: Path,
        milestones: list[int],
        checkpoint_dir: Path | None,
        label: str = "run",
    ):
        self.cfg, self.study_root = cfg, study_root
        self.log_dir, self.milestones, self.checkpoint_dir, self.label = (
            log_dir,
            milestones,
            checkpoint_dir,
            label,
        )
        self.world_size = cfg.train.num_processes
        self.children: list[tuple[int, subprocess.Popen, Path]] = []
        self._joined: contextlib.AbstractContextManager | None = None
        self._left = False

    def __enter__(self) -> Ranks:
        if self.world_size == 1:
            return self
        from sdsweep.models.loading import resolve_model_source, select_device

        device = select_device(self.cfg.device)
        check_devices(self.cfg, device)
        # The model on disk before the other ranks start: they then only read it. A rank other than 0
        # must not build an offline model (tiny, shapes): inside a process group, transformers'
        # save_pretrained silently writes nothing there, which would leave a text encoder without weights.
        resolve_model_source(self.cfg.model, self.cfg.paths.cache)
        cuda = device.type == "cuda"
        threads = None if cuda else max(1, torch.get_num_threads() // self.world_size)
        port = free_port()
        self.log_dir.mkdir(parents=True, exist_ok=True)
        for rank in range(1, self.world_size):
            spec = RankSpec(
                rank=rank,
                world_size=self.world_size,
                port=port,
                config=to_yaml(self.cfg),
                study_root=str(self.study_root),
                milestones=list(self.milestones),
                checkpoint_dir=str(self.checkpoint_dir) if self.checkpoint_dir is not None else None,
                threads=threads,
                cuda=cuda,
            )
            log_path = self.log_dir / f"{self.label}-rank{rank}.log"
            # A file, not argv: the config may hold a storage URL with a password, and argv is public.
            spec_path = io.atomic_write_text(self.log_dir / f"{self.label}-rank{rank}.json", spec.to_json())
            env = {**os.environ, "PYTHONUNBUFFERED": "1"}
            if threads:
                env["OMP_NUM_THREADS"] = env["SDSWEEP_TORCH_THREADS"] = str(threads)
            with open(log_path, "w", encoding="utf-8") as log_file:
                proc = subprocess.Popen(
                    [sys.executable, "-m", "sdsweep.training.rank", str(spec_path)],
                    stdout=log_file,
                    stderr=subprocess.STDOUT,
                    env=env,
                    preexec_fn=signals.die_with_parent,
                )
            self.children.append((rank, proc, log_path))
        print(
            f"[sdsweep] {self.label}: {self.world_size} ranks, global batch "
            f"{self.cfg.train.train_batch_size} x {self.world_size} x {self.cfg.train.gradient_accumulation_steps}"
            f" (batch x ranks x accumulation) on {'GPUs' if cuda else f'CPU, {threads} threads per rank'}",
            flush=True,
        )
        self._joined = joined(0, self.world_size, port, threads, cuda)
        try:
            self._joined.__enter__()
        except Exception as error:  # a rank never joined: stop the others, say which one and why
            self._stop_all()
            raise RankFailed(self.failure() or f"the ranks did not join: {error}") from error
        if cuda:
            threading.Thread(target=self._watch, name="sdsweep-rank-watch", daemon=True).start()
        return self

    def _watch(self) -> None:
        """NCCL waits for a dead peer until the timeout: abort the group as soon as a rank crashes
        (gloo notices the closed connection by itself)."""
        while self._joined is not None and not self._left:
            if self.failure() is not None:
                from torch.distributed.distributed_c10d import _abort_process_group

                with contextlib.suppress(Exception):
                    _abort_process_group()
                return
            time.sleep(1.0)

    def __exit__(self, exc_type, exc, tb) -> bool:
        if self.world_size == 1:
            return False
        assert self._joined is not None
        self._left = True
        try:
            if exc_type is None:
                self._wait(CHILD_EXIT_SECONDS)
            else:  # rank 0 failed (or a peer vanished): give the others a moment to report, then stop them
                self._wait(5)
        finally:
            self._stop_all()
            self._joined.__exit__(None, None, None)
        failure = self.failure()
        if failure is not None and (exc_type is None or issubclass(exc_type, Exception)):
            raise RankFailed(failure) from exc
        return False

    def _wait(self, seconds: float) -> None:
        for _, proc, _ in self.children:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=seconds)

    def _stop_all(self) -> None:
        for _, proc, _ in self.children:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for _, proc, _ in self.children:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def failure(self) -> str | None:
        """The first crashed rank and its error line (from its log), or None."""
        for rank, proc, log_path in self.children:
            code = proc.poll()
            if code in (0, None, -signal.SIGTERM, -signal.SIGKILL):  # stopped by us, not crashed
                continue
            lines = log_path.read_text(encoding="utf-8", errors="replace").splitlines()
            # torch prefixes a distributed process's traceback lines with "[rankN]: "
            stripped = [_RANK_PREFIX.sub("", line).strip() for line in lines]
            errors = [line for line in stripped if ERROR_LINE.match(line)]
            detail = errors[-1] if errors else f"exit code {code}"
            return f"rank {rank} of {self.world_size} failed: {detail} (log: {log_path})"
        return None
