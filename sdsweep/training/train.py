"""The one training loop. It knows nothing of W&B or Optuna: logging and pruning arrive as hooks.

Reads top to bottom: set up optimiser and schedule, resume if a checkpoint exists, then step until the
last milestone, writing a checkpoint and calling back at every milestone (where the caller evaluates
and may ask to stop).

Overhead is kept to what a bare PyTorch loop does: the only host sync per step is reading the loss
once (needed for divergence checks and logs), and checkpoints are written only at milestones.
"""

from __future__ import annotations

import json
import logging
import math
import random
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sdsweep import io
from sdsweep.config.schema import Config, flatten
from sdsweep.data.buckets import BucketBatchSampler
from sdsweep.data.images import collate, draw_seed, split_key
from sdsweep.models.loading import resolve_mixed_precision
from sdsweep.training import distributed, optimizers
from sdsweep.training.methods.base import NOISE_SEEDS

logger = logging.getLogger(__name__)

CHECKPOINT_PREFIX = "step-"
METHOD_STATE = "method.safetensors"
OPTIMIZER_STATE = "optimizer.pt"
RNG_STATE = "rng.pt"
TRAINING_STATE = "state.json"  # written last: a folder without it is not a checkpoint
# With these schedules the lr at step s depends on the total step count.
TOTAL_DEPENDENT_SCHEDULES = ("cosine", "linear")


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


# ---- optimiser and schedule --------------------------------------------------------------------------
def effective_learning_rate(cfg: Config) -> float:
    lr = cfg.method.learning_rate
    if cfg.method.scale_lr:
        # The global batch, as diffusers' examples scale it.
        lr *= cfg.train.train_batch_size * cfg.train.gradient_accumulation_steps * cfg.train.num_processes
    return lr


def make_optimizer(
    cfg: Config, params: list[torch.nn.Parameter], device: torch.device
) -> torch.optim.Optimizer:
    """``train.optimizer`` over ``params`` (see sdsweep.training.optimizers) at the effective learning rate."""
    return optimizers.make_optimizer(cfg, params, device, effective_learning_rate(cfg))


def make_lr_schedule(cfg: Config, optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LRScheduler:
    """The configured schedule over ``train.max_train_steps`` optimizer steps.

    The total is the trial's configured step count, not the run's last milestone: with cosine/linear
    the lr at step s depends on the total, and a trial of S steps must follow exactly the schedule a
    standalone S-step run follows. (Constant schedules ignore the total, which is what lets one run
    serve several step counts as milestones.)
    """
    from diffusers.optimization import get_scheduler

    return get_scheduler(
        cfg.train.lr_scheduler,
        optimizer=optimizer,
        num_warmup_steps=cfg.train.lr_warmup_steps,
        num_training_steps=cfg.train.max_train_steps,
    )


def _check_milestones(cfg: Config, milestones: list[int]) -> list[int]:
    cleaned = sorted({int(m) for m in milestones})
    if not cleaned or cleaned[0] < 1:
        raise ValueError(f"train() needs milestones of at least 1 step; got {milestones}.")
    if cfg.train.lr_scheduler in TOTAL_DEPENDENT_SCHEDULES and cleaned[-1] > cfg.train.max_train_steps:
        raise ValueError(
            f"train.lr_scheduler={cfg.train.lr_scheduler} is defined over train.max_train_steps="
            f"{cfg.train.max_train_steps} steps, but training was asked to run to step {cleaned[-1]}. "
            "Raise train.max_train_steps or use a constant schedule."
        )
    return cleaned


# ---- data ----------------------------------------------------------------------------------------------
class SeededInfiniteSampler(torch.utils.data.Sampler):
    """An endless stream of dataset keys: epoch e is a permutation drawn from a torch Generator seeded by
    ``(seed, e)``, so the k-th draw depends only on ``(seed, k)`` and a resumed run can start at draw k.

    Datasets that declare ``supports_draw_keys`` get ``(index, draw)`` keys, which seed their
    per-draw augmentation (flip, crop, VAE sample); others get plain indices.

    With ``world_size`` > 1 the stream is cut into chunks of ``chunk`` draws (one rank's batch) and
    rank r keeps chunks r, r + world_size, ...: the ranks' batches of one step together are exactly the
    draws a single process takes with a world_size times larger batch.
    """

    def __init__(
        self,
        size: int,
        seed: int,
        start: int = 0,
        draw_keys: bool = True,
        rank: int = 0,
        world_size: int = 1,
        chunk: int = 1,
    ):
        if size < 1:
            raise ValueError("The training dataset is empty; there is nothing to train on.")
        self.size, self.seed, self.start, self.draw_keys = size, seed, start, draw_keys
        self.rank, self.world_size, self.chunk = rank, world_size, chunk

    def epoch_order(self, epoch: int) -> list[int]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.size, generator=generator).tolist()

    def __iter__(self) -> Iterator[Any]:
        draw = self.start
        while True:
            epoch, offset = divmod(draw, self.size)
            for index in self.epoch_order(epoch)[offset:]:
                if (draw // self.chunk) % self.world_size == self.rank:
                    yield (index, draw) if self.draw_keys else index
                draw += 1


class RankBatches(torch.utils.data.Sampler):
    """Every ``world_size``-th batch of a batch sampler, from batch ``rank`` on (bucketed data)."""

    def __init__(self, batches: torch.utils.data.Sampler, rank: int, world_size: int):
        self.batches, self.rank, self.world_size = batches, rank, world_size

    def __iter__(self) -> Iterator[Any]:
        for number, batch in enumerate(self.batches):
            if number % self.world_size == self.rank:
                yield batch


def infinite_batches(
    dataset: torch.utils.data.Dataset,
    batch_size: int,
    seed: int,
    skip: int = 0,
    rank: int = 0,
    world_size: int = 1,
) -> Iterator[dict[str, Any]]:
    """Collated batches forever, starting after ``skip`` draws (of all ranks together); with
    ``world_size`` > 1 only this rank's share (deterministic: see ``SeededInfiniteSampler``).

    No worker processes: items are cached latents or pre-decoded, pre-resized images (a crop and a
    tensor conversion), cheaper than a worker's IPC; on CPU workers would also take the model's cores.
    """
    bucket_ids = getattr(dataset, "bucket_ids", None)
    if bucket_ids is not None:  # aspect-ratio buckets: every batch comes from one bucket (one shape)
        batch_sampler = BucketBatchSampler(bucket_ids, batch_size, seed, start=skip // batch_size)
        loader = torch.utils.data.DataLoader(
            dataset,
            batch_sampler=RankBatches(batch_sampler, rank, world_size) if world_size > 1 else batch_sampler,
            collate_fn=collate,
            num_workers=0,
            generator=torch.Generator().manual_seed(seed),  # as below: keep the global RNG untouched
        )
        return iter(loader)
    sampler = SeededInfiniteSampler(
        len(dataset),
        seed,
        skip,
        getattr(dataset, "supports_draw_keys", False),
        rank=rank,
        world_size=world_size,
        chunk=batch_size,
    )
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        collate_fn=collate,
        num_workers=0,
        # Its own generator: otherwise creating the iterator draws a seed from the global torch RNG,
        # which shifts the noise of every later step and breaks resume equality.
        generator=torch.Generator().manual_seed(seed),
    )
    return iter(loader)


class CaptionDropout(torch.utils.data.Dataset):
    """Replaces a draw's caption by the empty one with probability ``probability``.

    Training some samples unconditionally keeps the empty-prompt branch that classifier-free guidance
    subtracts in tune with the fine-tuned model (kohya, SimpleTuner and OneTrainer all offer it). The
    choice for draw ``(index, draw)`` comes from its own seeded stream, so it is reproducible and a
    resumed run drops exactly the captions an uninterrupted one would. Cached text embeddings of a
    dropped sample become ``empty_embedding``.
    """

    SALT = 0x5EED_CA9  # keeps the dropout stream apart from the flip/crop stream of the same draw

    def __init__(
        self,
        dataset: torch.utils.data.Dataset,
        probability: float,
        seed: int,
        empty_embedding: torch.Tensor | None = None,
    ):
        self.dataset, self.probability, self.seed = dataset, probability, seed
        self.empty_embedding = empty_embedding
        self.supports_draw_keys = getattr(dataset, "supports_draw_keys", False)
        self.bucket_ids = getattr(dataset, "bucket_ids", None)

    def __len__(self) -> int:
        return len(self.dataset)

    def dropped(self, key: Any) -> bool:
        index, draw = split_key(key)
        return random.Random(draw_seed(self.seed + self.SALT, index, draw)).random() < self.probability

    def __getitem__(self, key: Any) -> dict[str, Any]:
        item = self.dataset[key]
        if not self.dropped(key):
            return item
        item = {**item, "caption": ""}
        if "encoder_hidden_states" in item:
            item["encoder_hidden_states"] = self.empty_embedding
        return item


def with_caption_dropout(cfg: Config, method: Any, dataset: torch.utils.data.Dataset):
    """The dataset wrapped in ``CaptionDropout`` when ``train.caption_dropout`` > 0."""
    if not cfg.train.caption_dropout:
        return dataset
    empty = None
    if getattr(dataset, "text_rows", None) is not None:  # cached text embeddings: encode "" once
        with torch.no_grad():
            empty = method.encode_text([""])[0].detach().float().cpu()
    return CaptionDropout(dataset, cfg.train.caption_dropout, cfg.train.seed, empty)


# ---- checkpoints ----------------------------------------------------------------------------------------
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
        and key != "data.path"  # the same folder may be reached by another path spelling
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


# ---- the loop ----------------------------------------------------------------------------------------------
NOISE_SALT = 0x401_5E  # keeps the noise stream apart from the flip/crop and caption-dropout streams


def noise_seeds(seed: int, step: int, first: int, count: int) -> list[int]:
    """Seeds of samples ``first .. first+count-1`` of the global batch of optimizer step ``step``
    (global index: micro-step, then rank, then position), the same for 1 or N ranks."""
    return [draw_seed(seed + NOISE_SALT, first + i, step) for i in range(count)]


# ---- configuring the model ----------------------------------------------------------------------------------------------
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
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration, InitProcessGroupKwargs, set_seed

    started = time.perf_counter()
    hooks = hooks or TrainHooks()
    milestones = _check_milestones(cfg, milestones)
    last, milestone_set = milestones[-1], set(milestones)
    device = torch.device(method.device)
    accelerator = Accelerator(
        mixed_precision=resolve_mixed_precision(cfg.train.mixed_precision, device),
        gradient_accumulation_steps=cfg.train.gradient_accumulation_steps,
        cpu=device.type == "cpu",
        device_placement=False,  # the method placed its modules; optimizer state follows the parameters
        # One schedule step per optimizer step whatever the rank count (accelerate would otherwise step
        # the schedule num_processes times, for a dataloader it shortened).
        dataloader_config=DataLoaderConfiguration(split_batches=True),
        kwargs_handlers=[InitProcessGroupKwargs(timeout=distributed.TIMEOUT)],
    )
    rank, world_size = accelerator.process_index, accelerator.num_processes
    if world_size != cfg.train.num_processes:
        raise ValueError(
            f"train.num_processes={cfg.train.num_processes}, but this process is in a group of {world_size}: "
            "start data-parallel runs through sdsweep.training.distributed.Ranks (sdsweep.sweep.run_executor does)."
        )
    is_main = rank == 0
    _configure_unet(cfg, method, device)
    params = method.trainable_parameters()
    if not params:
        raise ValueError(f"method {cfg.method.name!r} has no trainable parameters; did prepare() run?")
    # Prepared, the optimizer and schedule skip their step on accumulation micro-steps, and the fp16
    # grad scaler unscales the gradients before clipping.
    raw_optimizer = make_optimizer(cfg, params, device)
    optimizer, lr_schedule = accelerator.prepare(raw_optimizer, make_lr_schedule(cfg, raw_optimizer))

    loop = LoopState()
    resume = latest_checkpoint(checkpoint_dir, at_most=milestones[0])
    if resume is None:
        # Python, numpy, torch and CUDA. Noise and timesteps come from per-sample seeds (NOISE_SEEDS);
        # what still draws from the global RNG differs per rank, rank 0 matching a single process.
        set_seed(cfg.train.seed + rank)
    else:
        logger.info("resuming from %s", resume[1])
        check_resumable(resume[1], cfg)
        loop = load_checkpoint(resume[1], method, optimizer, lr_schedule)
    result = TrainResult(final_step=loop.step)
    save_checkpoints = checkpoint_dir is not None and cfg.train.checkpoint_at_milestones

    def reach_milestone(step: int, save: bool) -> bool:
        """Checkpoint (before the caller's evaluation, which may be killed), then call back; rank 0
        only, the other ranks wait for its decision."""
        stop = False
        if is_main:
            if save:
                save_checkpoint(checkpoint_dir, cfg, method, optimizer, lr_schedule, loop)
            method.set_train_mode(False)
            stop = hooks.on_milestone(step)
            method.set_train_mode(True)
        if world_size > 1:
            stop = distributed.agree(stop, device)
        if stop and step < last:
            result.stopped_early = True
            result.stop_reason = f"on_milestone asked to stop at step {step}"
        return stop

    accumulation = cfg.train.gradient_accumulation_steps
    batch_size = cfg.train.train_batch_size
    dataset = with_caption_dropout(cfg, method, dataset)
    batches = infinite_batches(
        dataset,
        batch_size,
        cfg.train.seed,
        skip=loop.step * batch_size * accumulation * world_size,
        rank=rank,
        world_size=world_size,
    )
    modules = [m for m in (method.components.unet, method.components.text_encoder) if m is not None]
    method.set_train_mode(True)
    # A checkpoint at a milestone: the run was killed during that milestone's callback; redo it.
    stop = loop.step in milestone_set and reach_milestone(loop.step, save=False)
    while not stop and loop.step < last:
        tick = time.perf_counter()
        loss_sum = None
        for micro in range(accumulation):
            batch = next(batches)
            first = ((loop.step * accumulation + micro) * world_size + rank) * batch_size
            batch[NOISE_SEEDS] = noise_seeds(cfg.train.seed, loop.step, first, method.batch_size_of(batch))
            batch = method.augment_batch(batch)
            with accelerator.accumulate(*modules):
                with accelerator.autocast():
                    loss, logs = method.compute_loss(batch)
                accelerator.backward(loss)  # divides by the accumulation steps
                if accelerator.sync_gradients and world_size > 1:
                    distributed.average_gradients(params, world_size)
                if accelerator.sync_gradients and cfg.train.max_grad_norm:
                    accelerator.clip_grad_norm_(params, cfg.train.max_grad_norm)
                optimizer.step()  # prepared: a no-op on accumulation micro-steps
                lr_schedule.step()
                optimizer.zero_grad(set_to_none=True)
            detached = loss.detach()
            loss_sum = detached if loss_sum is None else loss_sum + detached
        method.after_optimizer_step()
        loop.step += 1
        if world_size > 1:  # the global batch's loss, the same on every rank (divergence agrees)
            loss_sum = distributed.mean_over_ranks(loss_sum, world_size)
        value = float(loss_sum) / accumulation  # the one host sync per step
        _check_loss(cfg, value, loop.step, loop)
        result.step_seconds.append(time.perf_counter() - tick)
        if is_main and loop.step % cfg.train.log_every == 0:
            step_logs = {key: float(v) for key, v in logs.items()}
            step_logs.update({"train/loss": value, "train/lr": lr_schedule.get_last_lr()[0]})
            hooks.on_step(loop.step, step_logs)
        if loop.step in milestone_set:
            stop = reach_milestone(loop.step, save=save_checkpoints)
    result.final_step = loop.step
    result.seconds = time.perf_counter() - started
    return result
