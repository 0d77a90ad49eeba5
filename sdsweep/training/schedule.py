"""The learning-rate schedule over a trial's step count, and the milestones such a schedule can serve."""

from __future__ import annotations

import torch

from sdsweep.config.schema import Config

# With these schedules the lr at step s depends on the total step count.
TOTAL_DEPENDENT_SCHEDULES = ("cosine", "linear")


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


def check_milestones(cfg: Config, milestones: list[int]) -> list[int]:
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
