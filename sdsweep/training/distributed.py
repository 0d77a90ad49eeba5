"""Data parallelism inside one run (``train.num_processes``): N ranks train one model together.

The run's own process (the in-process driver or a pool worker) is rank 0: it evaluates, writes
checkpoints, weights and metrics.json, and talks to Optuna and W&B. ``Ranks`` starts ranks 1..N-1 as
child processes (``python -m sdsweep.sweep.rank``) that only train. Every rank joins a torch.distributed
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
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch

from sdsweep import io, signals
from sdsweep.config.load import to_yaml
from sdsweep.config.schema import Config
from sdsweep.errors import ConfigError
from sdsweep.exits import ERROR_LINE

MASTER_ADDR = "127.0.0.1"  # one machine: the ranks of a run never span hosts
ENV_KEYS = (
    "RANK",
    "WORLD_SIZE",
    "LOCAL_RANK",
    "LOCAL_WORLD_SIZE",
    "MASTER_ADDR",
    "MASTER_PORT",
    "OMP_NUM_THREADS",
)
# Ranks 1..N-1 wait in a collective while rank 0 evaluates a milestone; an evaluation longer than this
# would time the group out.
TIMEOUT = timedelta(hours=2)
# Joining happens before any model loads (right after the imports), so a rank that never joins (it
# crashed on start) fails the run after this long rather than after TIMEOUT.
JOIN_TIMEOUT = timedelta(minutes=5)
CHILD_EXIT_SECONDS = 120  # how long rank 0 waits for the other ranks to leave after the last step
_RANK_PREFIX = re.compile(r"^\[rank\d+\]:")


class RankFailed(RuntimeError):
    """Another rank of this run crashed; the message is its reason."""


@dataclass
class RankSpec:
    """What a child rank needs to build the same model and train the same steps as rank 0."""

    rank: int
    world_size: int
    port: int
    config: str  # the run's config, resolved YAML: the rank reads it back, never composes it
    study_root: str
    milestones: list[int]
    checkpoint_dir: str | None
    threads: int | None
    cuda: bool

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> RankSpec:
        return cls(**json.loads(text))


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


def process_rank() -> int:
    """This process's rank in the run's group (0 outside data-parallel runs)."""
    initialized = torch.distributed.is_available() and torch.distributed.is_initialized()
    return torch.distributed.get_rank() if initialized else 0


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((MASTER_ADDR, 0))
        return int(sock.getsockname()[1])


def reset_accelerate() -> None:
    """Accelerate keeps its process group state in singletons: a later run must not inherit it."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


@contextlib.contextmanager
def joined(rank: int, world_size: int, port: int, threads: int | None, cuda: bool) -> Iterator[None]:
    """This process as rank ``rank``: the environment accelerate reads, undone afterwards (an
    in-process sweep runs its next, maybe single-process, run in the same process)."""
    saved = {key: os.environ.get(key) for key in ENV_KEYS}
    saved_threads = torch.get_num_threads()
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world_size),
        MASTER_ADDR=MASTER_ADDR,
        MASTER_PORT=str(port),
    )
    if threads:
        os.environ["OMP_NUM_THREADS"] = str(threads)  # accelerate would otherwise pick its own split
        torch.set_num_threads(threads)
    if cuda:
        torch.cuda.set_device(rank)  # "cuda" now means this rank's GPU for every module and tensor
    reset_accelerate()
    try:
        # Joined here, not lazily in Accelerator(): accelerate finds the group and adopts it.
        torch.distributed.init_process_group(
            backend="nccl" if cuda else "gloo",
            init_method=f"tcp://{MASTER_ADDR}:{port}",
            rank=rank,
            world_size=world_size,
            timeout=JOIN_TIMEOUT,
        )
        from torch.distributed.distributed_c10d import _set_pg_timeout

        _set_pg_timeout(TIMEOUT)
        yield
    finally:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        reset_accelerate()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        torch.set_num_threads(saved_threads)


# ---- what the training loop asks of accelerate on N ranks ------------------------------------------------
def ddp_options() -> Any:
    """How ``accelerator.prepare`` wraps a trained module in torch DDP (ignored on one rank).

    - ``find_unused_parameters=False``: every parameter that requires grad gets a gradient every step
      in each method; frozen ones (LoRA's base weights, textual inversion's encoder layers, requires_grad
      False) are not DDP's concern, it only hooks trainable parameters. True would traverse the autograd
      graph after every forward.
    - ``gradient_as_bucket_view=True``: the gradients are views into the all-reduce buckets instead of a
      second copy (one gradient's worth of memory: 3.4 GB for an fp32 SD UNet).
    - buffers: left to DDP's default (synced before each forward). The UNet has none and the text
      encoder one constant (CLIP's position ids); torch 2.13 deprecates ``broadcast_buffers``.
    - ``static_graph`` stays False: diffusers' gradient checkpointing is non-reentrant, which DDP handles
      without it (only reentrant checkpointing needs it).
    """
    from accelerate.utils import DistributedDataParallelKwargs

    return DistributedDataParallelKwargs(find_unused_parameters=False, gradient_as_bucket_view=True)


@contextlib.contextmanager
def rank_batches(accelerator: Any, loader: torch.utils.data.DataLoader) -> Iterator[Iterator[dict[str, Any]]]:
    """This rank's slices of ``loader``'s global batches, through accelerate's prepared loader
    (``split_batches``: rank r loads positions r*b .. (r+1)*b - 1 of each), while the block runs.

    accelerate registers a prepared loader in its GradientState singleton until the loader runs out. An
    endless one never does, so it is unregistered on leaving; otherwise every run of a long-lived worker
    would keep its dataset alive there.
    """
    prepared = accelerator.prepare(loader)
    stream = iter(prepared)
    try:
        yield stream
    finally:
        stream.close()
        prepared.end()


def agree(flag: bool, device: torch.device) -> bool:
    """Rank 0's decision for every rank; the others wait here while rank 0 evaluates a milestone."""
    tensor = torch.tensor([1 if flag else 0], device=device)
    torch.distributed.broadcast(tensor, src=0)
    return bool(tensor.item())


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
                    [sys.executable, "-m", "sdsweep.sweep.rank", str(spec_path)],
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
