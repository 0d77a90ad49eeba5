"""Section 2, per-step overhead: sdsweep's training loop against a bare PyTorch loop doing the same math.

Both sides train their own copy of the tiny model on the same data (batch 2, 32 px): VAE encode, text
encode, noise, UNet, MSE, backward, AdamW with the same hyperparameters. sdsweep's per-step times are its
own (``TrainResult.step_seconds``: setup excluded); the bare loop is timed the same way around each step.
Target (issue #7): sdsweep's median step at most 1.1x the bare loop's.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Any

STEP_OVERRIDES = [
    "model=tiny",
    "data=demo",
    "method=full",
    "tracking=none",
    "train.train_batch_size=2",
    "train.use_latent_cache=false",  # the bare loop encodes pixels every step, so sdsweep does too
    "train.max_grad_norm=0",  # the bare loop does not clip; the same math on both sides
    "train.checkpoint_at_milestones=false",
]


@dataclass(frozen=True)
class StepPlan:
    block: int  # training steps per timed block
    repeats: int  # interleaved blocks per side


FULL_PLAN = StepPlan(block=20, repeats=5)
QUICK_PLAN = StepPlan(block=3, repeats=2)


def fresh_setup(cfg) -> tuple[Any, Any]:
    """Components + prepared full fine-tune method + the pixel dataset, as a trial builds them."""
    import torch

    from sdsweep.data.examples import load_examples
    from sdsweep.data.images import dataset_for
    from sdsweep.models.loading import load_components
    from sdsweep.training.methods import get_method

    device = torch.device("cpu")
    components = load_components(cfg, device)
    method = get_method(cfg.method.name)(cfg, components, device)
    method.prepare()
    return method, dataset_for(cfg, load_examples(cfg), method.transform_caption)


def sdsweep_block(cfg, method, dataset, steps: int) -> list[float]:
    """Per-step seconds of ``sdsweep.training.train.train`` (its own timestamps: setup excluded)."""
    from sdsweep.training.train import TrainHooks, train

    result = train(cfg, method, dataset, [steps], TrainHooks())
    return list(result.step_seconds)


class BareLoop:
    """The same step written as a bare loop: VAE encode, text encode, noise, UNet, MSE, AdamW."""

    def __init__(self, cfg, method, dataset):
        import torch

        from sdsweep.data.images import collate

        self.c = method.components
        self.dataset = dataset
        self.collate = collate
        self.batch_size = cfg.train.train_batch_size
        self.position = 0
        t = cfg.train
        self.optimizer = torch.optim.AdamW(
            [p for p in self.c.unet.parameters() if p.requires_grad],
            lr=cfg.method.learning_rate,
            betas=(t.adam_beta1, t.adam_beta2),
            eps=t.adam_epsilon,
            weight_decay=t.adam_weight_decay,
        )

    def next_batch(self) -> dict[str, Any]:
        n = len(self.dataset)
        picks = [(self.position + i) % n for i in range(self.batch_size)]
        self.position += self.batch_size
        return self.collate([self.dataset[i] for i in picks])

    def step(self) -> float:
        import torch
        import torch.nn.functional as F

        c = self.c
        batch = self.next_batch()
        with torch.no_grad():
            latents = c.vae.encode(batch["pixel_values"]).latent_dist.sample() * c.vae.config.scaling_factor
            ids = c.tokenizer(
                batch["captions"],
                padding="max_length",
                max_length=c.tokenizer.model_max_length,
                truncation=True,
                return_tensors="pt",
            ).input_ids
            text = c.text_encoder(ids, return_dict=False)[0]
        noise = torch.randn_like(latents)
        timesteps = torch.randint(0, c.noise_scheduler.config.num_train_timesteps, (latents.shape[0],))
        noisy = c.noise_scheduler.add_noise(latents, noise, timesteps)
        prediction = c.unet(noisy, timesteps, text, return_dict=False)[0]
        loss = F.mse_loss(prediction.float(), noise.float())
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    def block(self, steps: int) -> list[float]:
        times = []
        for _ in range(steps):
            tick = time.perf_counter()
            self.step()
            times.append(time.perf_counter() - tick)
        return times


def run(quick: bool) -> dict[str, Any]:
    import torch

    from sdsweep.config.compose import compose_typed

    plan = QUICK_PLAN if quick else FULL_PLAN
    cfg = compose_typed(STEP_OVERRIDES)
    torch.manual_seed(0)
    ours, ours_data = fresh_setup(cfg)
    bare_method, bare_data = fresh_setup(cfg)  # separate weights: each side trains its own copy
    bare = BareLoop(cfg, bare_method, bare_data)
    sdsweep_block(cfg, ours, ours_data, plan.block)  # warm-up, untimed
    bare.block(plan.block)
    ours_times: list[float] = []
    bare_times: list[float] = []
    for repeat in range(plan.repeats):  # interleaved, alternating who goes first
        sides = [
            ("sdsweep", lambda: sdsweep_block(cfg, ours, ours_data, plan.block)),
            ("bare", lambda: bare.block(plan.block)),
        ]
        for name, run_block in sides if repeat % 2 == 0 else reversed(sides):
            (ours_times if name == "sdsweep" else bare_times).extend(run_block())
    ours_median, bare_median = statistics.median(ours_times), statistics.median(bare_times)
    return {
        "config": STEP_OVERRIDES,
        "batch_size": cfg.train.train_batch_size,
        "resolution": cfg.model.resolution,
        "steps_per_block": plan.block,
        "blocks_per_side": plan.repeats,
        "sdsweep_median_step_seconds": ours_median,
        "bare_median_step_seconds": bare_median,
        "sdsweep_mean_step_seconds": statistics.fmean(ours_times),
        "bare_mean_step_seconds": statistics.fmean(bare_times),
        "ratio": ours_median / bare_median,
    }
