"""Checkpoints of a training run: write one atomically, find the newest, refuse a mismatched one, load it.

A checkpoint folder ``step-<N>/`` holds the method's weights (safetensors), the optimizer and schedule
state, the RNG states and ``state.json`` (loop state plus the run's flattened config), written last.
"""

from __future__ import annotations

import json
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sdsweep import io
from sdsweep.config.resolve import flatten
from sdsweep.config.schema import Config

CHECKPOINT_PREFIX = "step-"
METHOD_STATE = "method.safetensors"
OPTIMIZER_STATE = "optimizer.pt"
RNG_STATE = "rng.pt"
TRAINING_STATE = "state.json"  # written last: a folder without it is not a checkpoint


@dataclass
class LoopState:
    """What, besides weights, optimizer and RNGs, a resumed run needs to continue identically."""

    step: int = 0
    first_loss: float | None = None  # the divergence check compares against the run's first loss


def latest_checkpoint(checkpoint_dir: Path | None, at_most: int) -> tuple[int, Path] | None:
    """The newest complete checkpoint with a step <= ``at_most``."""
    if checkpoint_dir is None or not checkpoint_dir.is_dir():
        return None
    found = []
    for path in checkpoint_dir.glob(f"{CHECKPOINT_PREFIX}*"):
        step = path.name.removeprefix(CHECKPOINT_PREFIX)
        if step.isdigit() and int(step) <= at_most and (path / TRAINING_STATE).is_file():
            found.append((int(step), path))
    return max(found) if found else None


def _rng_tensors() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def save_checkpoint(
    checkpoint_dir: Path, cfg: Config, method: Any, optimizer: Any, lr_schedule: Any, loop: LoopState
) -> Path:
    """Write ``step-<N>/`` atomically, then delete older checkpoints (only the newest is resumed)."""
    from safetensors.torch import save_file

    target = checkpoint_dir / f"{CHECKPOINT_PREFIX}{loop.step}"
    staging = io.staging_dir(target)
    save_file({k: v.contiguous() for k, v in method.state_dict().items()}, str(staging / METHOD_STATE))
    torch.save(
        {"optimizer": optimizer.state_dict(), "lr_schedule": lr_schedule.state_dict()},
        staging / OPTIMIZER_STATE,
    )
    torch.save(_rng_tensors(), staging / RNG_STATE)
    numpy_state = np.random.get_state()
    state = {
        "step": loop.step,
        "first_loss": loop.first_loss,
        "python_rng": random.getstate(),
        "numpy_rng": [numpy_state[0], numpy_state[1].tolist(), *numpy_state[2:]],
        "config": flatten(cfg),
    }
    (staging / TRAINING_STATE).write_text(json.dumps(state))
    io.replace_dir(staging, target)
    for old in checkpoint_dir.iterdir():
        stale_step = old.name.startswith(CHECKPOINT_PREFIX) and old != target
        stale_staging = old.name.startswith(f".{CHECKPOINT_PREFIX}") and old.name.endswith(".staging")
        if old.is_dir() and (stale_step or stale_staging):
            shutil.rmtree(old, ignore_errors=True)
    return target


# Keys that may differ between a checkpoint and the run resuming from it: one milestone-sharing run
# serves several step counts, and logging/evaluation/output settings do not change the weights.
RESUME_IGNORED_KEYS = ("train.max_train_steps", "train.log_every", "train.checkpoint_at_milestones")
RESUME_CHECKED_SECTIONS = ("model.", "method.", "data.", "train.")
LOCATION_KEYS = ("data.path", "model.path")


def check_resumable(path: Path, cfg: Config) -> None:
    """Refuse a checkpoint written by a differently configured run, before loading any weights."""
    saved = json.loads((path / TRAINING_STATE).read_text()).get("config", {})
    current = flatten(cfg)
    # A key added to the schema after the checkpoint was written (e.g. train.optimizer) matches when
    # the run keeps that key's default: the old run trained with exactly that behaviour.
    defaults = flatten(Config())
    differing = sorted(
        key
        for key in set(saved) | set(current)
        if key.startswith(RESUME_CHECKED_SECTIONS)
        and key not in RESUME_IGNORED_KEYS
        # Where the data and the model are is no setting: the same folder may be reached by another path
        # (a moved study, another mount point); the study's fingerprint checks what they hold.
        and key not in LOCATION_KEYS
        and saved.get(key) != current.get(key)
        and not (key not in saved and key in defaults and current.get(key) == defaults[key])
    )
    if differing:
        details = ", ".join(f"{k}: {saved.get(k)!r} -> {current.get(k)!r}" for k in differing[:5])
        raise ValueError(
            f"The checkpoint {path} was written by a run configured differently ({details}). "
            f"Delete {path.parent} to train from scratch, or resume with the original settings."
        )


def load_checkpoint(path: Path, method: Any, optimizer: Any, lr_schedule: Any) -> LoopState:
    from safetensors.torch import load_file

    method.load_state_dict(load_file(str(path / METHOD_STATE)))
    states = torch.load(path / OPTIMIZER_STATE, weights_only=True)
    optimizer.load_state_dict(states["optimizer"])
    lr_schedule.load_state_dict(states["lr_schedule"])
    rng = torch.load(path / RNG_STATE, weights_only=True)
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    state = json.loads((path / TRAINING_STATE).read_text())
    version, internal, gauss = state["python_rng"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, *rest = state["numpy_rng"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), *rest))
    return LoopState(step=int(state["step"]), first_loss=state["first_loss"])
