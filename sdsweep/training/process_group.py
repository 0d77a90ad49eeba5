"""One rank's membership of a run's process group: the spec a child rank is started with, ``joined``, and
what the training loop does as a member (``ddp_options``, ``rank_batches``, ``agree``).

Apart from ``distributed.py``, which starts and watches the ranks: the child entry (``training/rank.py``) and
the loop (``train.py``) need nothing of the module that launches them.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from datetime import timedelta
from typing import Any

import torch

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


def process_rank() -> int:
    """This process's rank in the run's group (0 outside data-parallel runs)."""
    initialized = torch.distributed.is_available() and torch.distributed.is_initialized()
    return torch.distributed.get_rank() if initialized else 0


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
