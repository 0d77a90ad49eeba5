"""The one training loop. It knows nothing of W&B or Optuna: logging and pruning arrive as hooks.

Reads top to bottom: set up optimiser and schedule, resume if a checkpoint exists, then step until the
last milestone, calling back at every milestone (where the caller evaluates and may ask to stop).
"""

from __future__ import annotations

import json
import math
import random
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from sdsweep import io
from sdsweep.config import Config
from sdsweep.data import collate
from sdsweep.models import resolve_mixed_precision

CHECKPOINT_PREFIX = "step-"


class TrainingDiverged(RuntimeError):
    """The loss became NaN/inf or exploded; the trial fails with this message as its reason."""


@dataclass
class TrainHooks:
    on_step: Callable[[int, dict[str, float]], None] = lambda step, logs: None
    on_milestone: Callable[[int], bool] = lambda step: False  # True: stop now (pruned, collapsed, done)


@dataclass
class TrainResult:
    final_step: int
    stopped_early: bool = False
    seconds: float = 0.0
    step_seconds: list[float] = field(default_factory=list)

    @property
    def steps_per_second(self) -> float:
        total = sum(self.step_seconds)
        return len(self.step_seconds) / total if total else 0.0


def effective_learning_rate(cfg: Config) -> float:
    lr = cfg.method.learning_rate
    if cfg.method.scale_lr:
        lr *= cfg.train.train_batch_size * cfg.train.gradient_accumulation_steps
    return lr


def make_optimizer(cfg: Config, params: list[torch.nn.Parameter], device: torch.device) -> torch.optim.Optimizer:
    kwargs = dict(
        lr=effective_learning_rate(cfg),
        betas=(cfg.train.adam_beta1, cfg.train.adam_beta2),
        eps=cfg.train.adam_epsilon,
        # Textual inversion must not decay the embedding matrix: the other rows are restored anyway,
        # but decay would shrink the learned vector away from the token-embedding scale.
        weight_decay=0.0 if cfg.method.name == "textual_inversion" else cfg.train.adam_weight_decay,
    )
    if cfg.method.use_8bit_adam:
        try:
            import bitsandbytes as bnb

            if device.type == "cuda":
                return bnb.optim.AdamW8bit(params, **kwargs)
        except ImportError:
            pass
        warnings.warn("method.use_8bit_adam needs bitsandbytes on a CUDA device; using torch AdamW", stacklevel=2)
    return torch.optim.AdamW(params, **kwargs)


def make_lr_schedule(cfg: Config, optimizer: torch.optim.Optimizer):
    from diffusers.optimization import get_scheduler

    # The total is the configured max_train_steps, not the run's last milestone: for cosine/linear the
    # lr at step s depends on it (which is why those schedules never share milestones).
    return get_scheduler(
        cfg.train.lr_scheduler,
        optimizer=optimizer,
        num_warmup_steps=cfg.train.lr_warmup_steps,
        num_training_steps=cfg.train.max_train_steps,
    )


def infinite_batches(dataset, batch_size: int, seed: int, skip: int = 0) -> Iterator[dict]:
    """A seeded reshuffle per epoch; item n of the stream depends only on (seed, n), so a run resumed
    after ``skip`` items sees exactly the batches an uninterrupted run would have seen."""
    n = len(dataset)
    position = skip

    def index_at(k: int) -> int:
        epoch, offset = divmod(k, n)
        order = list(range(n))
        random.Random(seed * 1_000_003 + epoch).shuffle(order)
        return order[offset]

    while True:
        picks = [index_at(position + i) for i in range(batch_size)]
        position += batch_size
        yield collate([dataset[i] for i in picks])


# ---- checkpoints ---------------------------------------------------------------------------------
def latest_checkpoint(checkpoint_dir: Path | None, at_most: int) -> tuple[int, Path] | None:
    if checkpoint_dir is None or not checkpoint_dir.exists():
        return None
    found = []
    for path in checkpoint_dir.glob(f"{CHECKPOINT_PREFIX}*"):
        step = path.name.removeprefix(CHECKPOINT_PREFIX)
        if step.isdigit() and int(step) <= at_most and (path / "state.json").exists():
            found.append((int(step), path))
    return max(found) if found else None


def save_checkpoint(checkpoint_dir: Path, step: int, method, optimizer, lr_schedule, batch_state: dict, cfg: Config) -> Path:
    from safetensors.torch import save_file

    from sdsweep.config import to_yaml

    target = checkpoint_dir / f"{CHECKPOINT_PREFIX}{step}"
    staging = io.staging_dir(target)
    save_file({k: v.contiguous() for k, v in method.state_dict().items()}, str(staging / "method.safetensors"))
    torch.save({"optimizer": optimizer.state_dict(), "lr_schedule": lr_schedule.state_dict()}, staging / "optimizer.pt")
    torch.save(
        {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(), "batches": batch_state},
        staging / "rng.pt",
    )
    (staging / "config.yaml").write_text(to_yaml(cfg))
    (staging / "state.json").write_text(json.dumps({"step": step}))
    io.replace_dir(staging, target)
    for old in checkpoint_dir.glob(f"{CHECKPOINT_PREFIX}*"):  # only the newest is ever resumed from
        if old != target and old.name.removeprefix(CHECKPOINT_PREFIX).isdigit():
            import shutil

            shutil.rmtree(old, ignore_errors=True)
    return target


def load_checkpoint(path: Path, method, optimizer, lr_schedule) -> dict:
    from safetensors.torch import load_file

    method.load_state_dict(load_file(str(path / "method.safetensors")))
    states = torch.load(path / "optimizer.pt", weights_only=False)  # our own file: optimizer state holds python scalars
    optimizer.load_state_dict(states["optimizer"])
    lr_schedule.load_state_dict(states["lr_schedule"])
    rng = torch.load(path / "rng.pt", weights_only=False)
    torch.set_rng_state(rng["torch"])
    np.random.set_state(rng["numpy"])
    random.setstate(rng["python"])
    return rng["batches"]


# ---- the loop --------------------------------------------------------------------------------------
def train(
    cfg: Config,
    method,
    dataset,
    milestones: list[int],
    hooks: TrainHooks | None = None,
    checkpoint_dir: Path | None = None,
) -> TrainResult:
    from accelerate import Accelerator

    hooks = hooks or TrainHooks()
    milestones = sorted(set(int(m) for m in milestones))
    last = milestones[-1]
    device = method.device
    accelerator = Accelerator(
        mixed_precision=resolve_mixed_precision(cfg.train.mixed_precision, device),
        gradient_accumulation_steps=cfg.train.gradient_accumulation_steps,
        cpu=device.type == "cpu",
    )
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = cfg.train.allow_tf32
        torch.backends.cudnn.allow_tf32 = cfg.train.allow_tf32
        if cfg.train.compile:
            method.components.unet = torch.compile(method.components.unet)
    torch.manual_seed(cfg.train.seed)
    params = method.trainable_parameters()
    optimizer = make_optimizer(cfg, params, device)
    lr_schedule = make_lr_schedule(cfg, optimizer)
    batch_seed = cfg.train.seed
    step = 0
    resume = latest_checkpoint(checkpoint_dir, at_most=milestones[0])
    if resume is not None:
        step, path = resume
        batch_seed = load_checkpoint(path, method, optimizer, lr_schedule).get("seed", batch_seed)
    per_step = cfg.train.train_batch_size * cfg.train.gradient_accumulation_steps
    batches = infinite_batches(dataset, cfg.train.train_batch_size, batch_seed, skip=step * per_step)
    result = TrainResult(final_step=step)
    started = time.perf_counter()
    if step in milestones and hooks.on_milestone(step):  # killed during this milestone's evaluation
        result.stopped_early = step < last
        return result
    first_loss = None
    method.set_train_mode(True)
    while step < last:
        tick = time.perf_counter()
        for _ in range(cfg.train.gradient_accumulation_steps):
            batch = method.augment_batch(next(batches))
            with accelerator.accumulate(*_modules(method)), accelerator.autocast():
                loss, logs = method.compute_loss(batch)
                accelerator.backward(loss)
                if accelerator.sync_gradients and cfg.train.max_grad_norm:
                    accelerator.clip_grad_norm_(params, cfg.train.max_grad_norm)
                optimizer.step()
                lr_schedule.step()
                optimizer.zero_grad(set_to_none=True)
        method.after_optimizer_step()
        step += 1
        value = float(loss.detach())  # the one host sync per step
        if not math.isfinite(value):
            raise TrainingDiverged(f"loss became {value} at step {step} (learning rate {effective_learning_rate(cfg):g})")
        first_loss = first_loss if first_loss is not None else max(value, 1e-8)
        if value > cfg.train.loss_explosion_factor * first_loss:
            raise TrainingDiverged(
                f"loss exploded to {value:.4g} at step {step}, over {cfg.train.loss_explosion_factor:g}x its first value "
                f"{first_loss:.4g} (learning rate {effective_learning_rate(cfg):g})"
            )
        result.step_seconds.append(time.perf_counter() - tick)
        if step % cfg.train.log_every == 0:
            hooks.on_step(step, {**{k: float(v) for k, v in logs.items()}, "train/lr": lr_schedule.get_last_lr()[0]})
        if step in milestones:
            if checkpoint_dir is not None and cfg.train.checkpoint_at_milestones and step < last:
                save_checkpoint(checkpoint_dir, step, method, optimizer, lr_schedule, {"seed": batch_seed}, cfg)
            method.set_train_mode(False)
            stop = hooks.on_milestone(step)
            method.set_train_mode(True)
            if stop:
                result.stopped_early = step < last
                break
    result.final_step = step
    result.seconds = time.perf_counter() - started
    return result


def _modules(method) -> list[torch.nn.Module]:
    return [method.components.unet, method.components.text_encoder]
