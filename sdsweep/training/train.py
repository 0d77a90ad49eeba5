"""The one training loop. It knows nothing of W&B or Optuna: logging and pruning arrive as hooks.

Reads top to bottom: set up optimiser and schedule, resume if a checkpoint exists, then step until the
last milestone, writing a checkpoint and calling back at every milestone (where the caller evaluates
and may ask to stop). The pieces with their own job live beside it: the batch stream (batches), caption
dropout, checkpoints, the lr schedule, the optimizer factory and the data-parallel glue (process_group).

Data parallelism is accelerate's: the method's trained modules (``TrainedModules``) go through
``accelerator.prepare`` (a DDP wrapper on N ranks, whose gradient all-reduce runs in buckets while
backward runs and is skipped on accumulation micro-steps), the training forward passes call the
prepared modules, and the loader is prepared with ``split_batches`` (each rank its slice of every
global batch). Saving, EMA, evaluation and checkpoints use the method's own, unwrapped modules.

Overhead is kept to what a bare PyTorch loop does: the only host sync per step is reading the loss
once (needed for divergence checks and logs), and checkpoints are written only at milestones.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from sdsweep.config.schema import Config
from sdsweep.models.loading import resolve_mixed_precision
from sdsweep.training import process_group
from sdsweep.training.batches import noise_seeds, training_loader
from sdsweep.training.caption_dropout import with_caption_dropout, with_tag_shuffle
from sdsweep.training.checkpoints import (
    LoopState,
    check_resumable,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from sdsweep.training.methods.base import NOISE_SEEDS, TrainedModules
from sdsweep.training.optimizers import effective_learning_rate, make_optimizer
from sdsweep.training.schedule import check_milestones, make_lr_schedule

logger = logging.getLogger(__name__)


class TrainingDiverged(RuntimeError):
    """The loss became NaN/inf or exploded; the trial fails with this message as its reason."""


def _no_logging(step: int, logs: dict[str, float]) -> None:
    pass


def _never_stop(step: int) -> bool:
    return False


@dataclass
class TrainHooks:
    on_step: Callable[[int, dict[str, float]], None] = _no_logging
    on_milestone: Callable[[int], bool] = _never_stop  # True: stop now (pruned, collapsed, done)


@dataclass
class TrainResult:
    final_step: int
    stopped_early: bool = False
    stop_reason: str | None = None
    seconds: float = 0.0  # wall-clock of the whole call, milestone callbacks included
    step_seconds: list[float] = field(default_factory=list)  # per optimizer step, callbacks excluded

    @property
    def steps_per_second(self) -> float:
        total = sum(self.step_seconds)
        return len(self.step_seconds) / total if total else 0.0


def _configure_unet(cfg: Config, method: Any, device: torch.device) -> None:
    unet = method.components.unet
    if cfg.train.gradient_checkpointing and not unet.is_gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = cfg.train.allow_tf32
        torch.backends.cudnn.allow_tf32 = cfg.train.allow_tf32
    if cfg.train.channels_last:
        unet.to(memory_format=torch.channels_last)
    if cfg.train.compile and not getattr(unet, "_sdsweep_compiled", False):
        # In place (nn.Module.compile): the UNet keeps its class, parameter names and
        # save_pretrained, so methods, checkpoints and saving are unaffected. Inductor runs on CUDA
        # (triton) and on CPU (a C compiler); preflight refuses the setting where neither is there.
        unet.compile()
        unet._sdsweep_compiled = True


def _make_accelerator(cfg: Config, device: torch.device) -> Any:
    """Mixed precision, gradient accumulation and (for N ranks) the process group this rank joined."""
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration, InitProcessGroupKwargs

    accelerator = Accelerator(
        mixed_precision=resolve_mixed_precision(cfg.train.mixed_precision, device),
        gradient_accumulation_steps=cfg.train.gradient_accumulation_steps,
        cpu=device.type == "cpu",
        device_placement=False,  # the method placed its modules; optimizer state follows the parameters
        # One schedule step per optimizer step whatever the rank count (accelerate would otherwise step
        # the schedule num_processes times), and each rank takes a slice of every global batch.
        dataloader_config=DataLoaderConfiguration(split_batches=True),
        kwargs_handlers=[InitProcessGroupKwargs(timeout=process_group.TIMEOUT), process_group.ddp_options()],
    )
    world_size = accelerator.num_processes
    if world_size != cfg.train.num_processes:
        raise ValueError(
            f"train.num_processes={cfg.train.num_processes}, but this process is in a group of {world_size}: "
            "start data-parallel runs through sdsweep.training.distributed.Ranks (sdsweep.sweep.run_executor does)."
        )
    return accelerator


def _prepare_trained(accelerator: Any, method: Any) -> TrainedModules:
    """The method's trained modules through ``accelerator.prepare``: on N ranks each becomes a DDP
    wrapper (rank 0's weights are broadcast to all at wrapping), on one rank it is the module itself.

    Under mixed precision accelerate also wraps the module's own forward in autocast, in place; that
    is taken off again (``unwrap_model(keep_fp32_wrapper=False)``): the loop's ``accelerator.autocast()``
    already covers the training forward, and the unwrapped module is what rank 0 evaluates and saves,
    in the evaluation's own precision.
    """
    trained = method.trained_modules()
    if not trained.modules():
        raise ValueError(f"method {method.name!r} has no trainable parameters; did prepare() run?")
    prepared = {}
    named = (
        ("unet", trained.unet),
        ("text_encoder", trained.text_encoder),
        ("text_encoder_2", trained.text_encoder_2),
    )
    for name, module in named:
        if module is not None:
            prepared[name] = accelerator.prepare(module)
            inner = accelerator.unwrap_model(prepared[name], keep_fp32_wrapper=False)
            inner.__dict__.pop("forward", None)  # back to the class's forward
    return TrainedModules(**prepared)


def _check_loss(cfg: Config, value: float, step: int, loop: LoopState) -> None:
    lr = effective_learning_rate(cfg)
    if not math.isfinite(value):
        raise TrainingDiverged(f"loss became {value} at step {step} (learning rate {lr:g})")
    if loop.first_loss is None:
        loop.first_loss = max(value, 1e-8)
    elif value > cfg.train.loss_explosion_factor * loop.first_loss:
        raise TrainingDiverged(
            f"loss exploded to {value:.4g} at step {step}, over {cfg.train.loss_explosion_factor:g}x its first "
            f"value {loop.first_loss:.4g} (learning rate {lr:g})"
        )


@dataclass
class _Run:
    """What one ``train`` call sets up and its steps share, passed explicitly instead of through closures."""

    cfg: Config
    method: Any
    hooks: TrainHooks
    device: torch.device
    accelerator: Any
    modules: TrainedModules
    params: Any
    optimizer: Any
    lr_schedule: Any
    loop: LoopState = field(default_factory=LoopState)
    result: TrainResult = field(default_factory=lambda: TrainResult(final_step=0))

    @property
    def rank(self) -> int:
        return self.accelerator.process_index

    @property
    def world_size(self) -> int:
        return self.accelerator.num_processes


def _set_up(cfg: Config, method: Any, hooks: TrainHooks) -> _Run:
    """Accelerator, UNet settings, the prepared trained modules, optimizer and lr schedule."""
    device = torch.device(method.device)
    accelerator = _make_accelerator(cfg, device)
    _configure_unet(cfg, method, device)  # compiled in place before wrapping: DDP wraps the compiled UNet
    modules = _prepare_trained(accelerator, method)
    params = method.trainable_parameters()
    # Prepared, the optimizer and schedule skip their step on accumulation micro-steps, and the fp16
    # grad scaler unscales the gradients before clipping.
    raw_optimizer = make_optimizer(cfg, params, device)
    optimizer, lr_schedule = accelerator.prepare(raw_optimizer, make_lr_schedule(cfg, raw_optimizer))
    return _Run(cfg, method, hooks, device, accelerator, modules, params, optimizer, lr_schedule)


def _resume_or_seed(run: _Run, checkpoint_dir: Path | None, first_milestone: int) -> None:
    """Load the newest checkpoint at or before the first milestone, or seed a fresh run."""
    from accelerate.utils import set_seed

    resume = latest_checkpoint(checkpoint_dir, at_most=first_milestone)
    if resume is None:
        # Python, numpy, torch and CUDA. Noise and timesteps come from per-sample seeds (NOISE_SEEDS);
        # what still draws from the global RNG differs per rank, rank 0 matching a single process.
        set_seed(run.cfg.train.seed + run.rank)
    else:
        logger.info("resuming from %s", resume[1])
        check_resumable(resume[1], run.cfg)
        run.loop = load_checkpoint(resume[1], run.method, run.optimizer, run.lr_schedule)
    run.result = TrainResult(final_step=run.loop.step)


def _batch_stream(run: _Run, dataset: torch.utils.data.Dataset) -> Any:
    """The single-process stream at the global batch, resumed after the draws of all ranks so far."""
    cfg = run.cfg
    global_batch = cfg.train.train_batch_size * run.world_size
    dataset = with_caption_dropout(cfg, run.method, with_tag_shuffle(cfg, dataset))
    skip = run.loop.step * global_batch * cfg.train.gradient_accumulation_steps
    return training_loader(dataset, global_batch, cfg.train.seed, skip=skip)


def _reach_milestone(run: _Run, step: int, last: int, checkpoint_dir: Path | None) -> bool:
    """Checkpoint into ``checkpoint_dir`` if given (before the caller's evaluation, which may be killed),
    then call back; rank 0 only, the other ranks wait for its decision. True: stop now."""
    stop = False
    if run.rank == 0:
        if checkpoint_dir is not None:
            save_checkpoint(checkpoint_dir, run.cfg, run.method, run.optimizer, run.lr_schedule, run.loop)
        run.method.set_train_mode(False)
        stop = run.hooks.on_milestone(step)
        run.method.set_train_mode(True)
    if run.world_size > 1:
        stop = process_group.agree(stop, run.device)
    if stop and step < last:
        run.result.stopped_early = True
        run.result.stop_reason = f"on_milestone asked to stop at step {step}"
    return stop


def _micro_step(run: _Run, batch: dict[str, Any], micro: int) -> tuple[torch.Tensor, dict[str, Any]]:
    """Forward and backward of one micro-batch; the optimizer steps on the last micro-step only."""
    cfg, method, accelerator = run.cfg, run.method, run.accelerator
    accumulation, batch_size = cfg.train.gradient_accumulation_steps, cfg.train.train_batch_size
    first = ((run.loop.step * accumulation + micro) * run.world_size + run.rank) * batch_size
    batch[NOISE_SEEDS] = noise_seeds(cfg.train.seed, run.loop.step, first, method.batch_size_of(batch))
    batch = method.augment_batch(batch)
    # Micro-steps run under DDP's no_sync: the all-reduce runs on the last one only.
    with accelerator.accumulate(*run.modules.modules()):
        with accelerator.autocast():
            loss, logs = method.compute_loss(batch, modules=run.modules)
        accelerator.backward(loss)  # divides by the accumulation steps
        if accelerator.sync_gradients and cfg.train.max_grad_norm:
            accelerator.clip_grad_norm_(run.params, cfg.train.max_grad_norm)
        run.optimizer.step()  # prepared: a no-op on accumulation micro-steps
        run.lr_schedule.step()
        run.optimizer.zero_grad(set_to_none=True)
    return loss.detach(), logs


def _optimizer_step(run: _Run, batches: Any) -> tuple[float, dict[str, Any]]:
    """One optimizer step over the accumulation micro-steps; the global batch's loss and the last logs."""
    accumulation = run.cfg.train.gradient_accumulation_steps
    loss_sum = None
    for micro in range(accumulation):
        detached, logs = _micro_step(run, next(batches), micro)
        loss_sum = detached if loss_sum is None else loss_sum + detached
    run.method.after_optimizer_step()
    run.loop.step += 1
    # The global batch's loss, the same on every rank (so the divergence check agrees).
    value = float(run.accelerator.reduce(loss_sum, reduction="mean")) / accumulation  # the one host sync
    _check_loss(run.cfg, value, run.loop.step, run.loop)
    return value, logs


def _log_step(run: _Run, value: float, logs: dict[str, Any]) -> None:
    """Every ``train.log_every`` steps, rank 0 reports the method's logs, the loss and the learning rate."""
    if run.rank == 0 and run.loop.step % run.cfg.train.log_every == 0:
        step_logs = {key: float(v) for key, v in logs.items()}
        step_logs.update({"train/loss": value, "train/lr": run.lr_schedule.get_last_lr()[0]})
        run.hooks.on_step(run.loop.step, step_logs)


def train(
    cfg: Config,
    method: Any,
    dataset: torch.utils.data.Dataset,
    milestones: list[int],
    hooks: TrainHooks | None = None,
    checkpoint_dir: Path | None = None,
) -> TrainResult:
    """Train to ``max(milestones)``, calling ``hooks.on_milestone`` at each milestone.

    With ``checkpoint_dir`` (and ``train.checkpoint_at_milestones``) a checkpoint is written at each
    milestone before the callback, and a later call resumes from the newest checkpoint at or before
    its first milestone; a checkpoint exactly at a milestone re-runs that milestone's callback without
    training (a sweep killed during an evaluation).
    """
    started = time.perf_counter()
    milestones = check_milestones(cfg, milestones)
    last, milestone_set = milestones[-1], set(milestones)
    run = _set_up(cfg, method, hooks or TrainHooks())
    _resume_or_seed(run, checkpoint_dir, milestones[0])
    save_to = checkpoint_dir if cfg.train.checkpoint_at_milestones else None
    loader = _batch_stream(run, dataset)
    method.set_train_mode(True)
    # A checkpoint at a milestone: the run was killed during that milestone's callback; redo it.
    stop = run.loop.step in milestone_set and _reach_milestone(run, run.loop.step, last, None)
    with process_group.rank_batches(run.accelerator, loader) as batches:
        while not stop and run.loop.step < last:
            tick = time.perf_counter()
            value, logs = _optimizer_step(run, batches)
            run.result.step_seconds.append(time.perf_counter() - tick)
            _log_step(run, value, logs)
            if run.loop.step in milestone_set:
                stop = _reach_milestone(run, run.loop.step, last, save_to)
    run.result.final_step = run.loop.step
    run.result.seconds = time.perf_counter() - started
    return run.result
