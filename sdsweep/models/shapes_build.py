"""The one-time pretraining of the shapes model: VAE, then CLIP, then the text-conditioned UNet.

Called by ``sdsweep.models.shapes_build.ensure_shapes_model`` into a staging folder; everything is seeded and the
algorithms deterministic, so two builds give the same weights. Separate from the world so that importing
the world (for the judge) never pulls in diffusers.
"""

from __future__ import annotations

import copy
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from sdsweep.models import shapes, tiny
from sdsweep.models.tokens import tokenize_prompts

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # the processor's normalisation, used while training too
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
CAPTION_DROPOUT = 0.1  # empty captions teach the unconditional branch that classifier-free guidance needs
UNET_LR = 2e-3  # high for a diffusion UNet, but this one is tiny and EMA smooths the end point
UNET_WARMUP = 50
EMA_DECAY = 0.995  # about the last 200 steps; the saved UNet is the average, which samples cleaner shapes
MIN_SNR_GAMMA = 5.0  # min-SNR weighting: low-noise steps stop dominating the loss, shapes form sooner


def _images(scenes: list[shapes.Scene]) -> torch.Tensor:
    """[N, 3, SIZE, SIZE] in [-1, 1]."""
    array = np.stack([np.asarray(shapes.draw(s), dtype=np.float32) for s in scenes]) / 127.5 - 1.0
    return torch.from_numpy(array).permute(0, 3, 1, 2).contiguous()


def _ids(tokenizer, captions: list[str]) -> torch.Tensor:
    return tokenize_prompts(tokenizer, captions)


def build_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        block_out_channels=(16, 32),  # flat-coloured shapes need little capacity; this keeps the build short
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=4,
        norm_num_groups=8,
        sample_size=shapes.SIZE,
    )


class _BuildProgress:
    """The build's progress as the sweep shows it (``sdsweep.progress``): a bar on a terminal, a plain line
    every 30 s in logs and CI, not thousands of carriage-return redraws."""

    def __init__(self, total: int):
        from sdsweep.progress import Progress

        self.progress = Progress("building the shapes model (once)", total, "steps")
        self.postfix = ""

    def set_postfix_str(self, text: str) -> None:
        self.postfix = text

    def update(self, count: int = 1) -> None:
        self.progress.advance(count, last=self.postfix)

    def __enter__(self) -> _BuildProgress:
        return self

    def __exit__(self, *exc) -> None:
        self.progress.close()


def train_vae(images: torch.Tensor, steps: int, batch: int, progress, seed: int):
    vae = build_vae()
    optimizer = torch.optim.AdamW(vae.parameters(), lr=2e-3, weight_decay=0.0)
    # Decaying to 10%: the last steps sharpen the thin star points (with a constant rate, red stars came
    # back brown and 15% of reconstructions fooled the judge).
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: 0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * s / max(1, steps)))
    )
    generator = torch.Generator().manual_seed(seed)
    for _step in range(steps):
        x = images[torch.randint(len(images), (batch,), generator=generator)]
        posterior = vae.encode(x).latent_dist
        z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=generator)
        recon = vae.decode(z).sample
        loss = F.mse_loss(recon, x) + 1e-5 * posterior.kl().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        progress.set_postfix_str(f"vae loss {loss.item():.4f}")
        progress.update()
    vae.eval().requires_grad_(False)
    make_posterior_deterministic(vae)
    with torch.no_grad():
        latents = torch.cat(
            [vae.encode(images[i : i + 256]).latent_dist.mean for i in range(0, len(images), 256)]
        )
    vae.register_to_config(scaling_factor=float(1.0 / latents.std()))
    return vae, latents * vae.config.scaling_factor


def make_posterior_deterministic(vae) -> None:
    """Make ``latent_dist.sample()`` equal ``latent_dist.mean``: the log-variance head outputs the floor (-30).

    The UNet is pretrained on posterior means, but sdsweep's trainer (like diffusers') fine-tunes on
    ``latent_dist.sample()``. With the nearly KL-free training above the posterior std came out at 0.73,
    above the spread of the means (0.58), so fine-tuning saw mostly noise: the star was never learned and
    the prior broke even at lr 1e-4. Applied after training, it leaves the means and the decoder unchanged.
    """
    channels = vae.config.latent_channels
    with torch.no_grad():
        vae.quant_conv.weight[channels:] = 0.0
        vae.quant_conv.bias[channels:] = -30.0


def build_clip(tokenizer):
    from transformers import CLIPConfig, CLIPModel, CLIPVisionConfig

    config = CLIPConfig(
        text_config=tiny.tiny_text_config(tokenizer).to_dict(),
        vision_config=CLIPVisionConfig(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=shapes.SIZE,
            patch_size=4,
        ).to_dict(),
        projection_dim=32,
    )
    return CLIPModel(config)


def clip_processor(tokenizer):
    from transformers import CLIPImageProcessor, CLIPProcessor

    image_processor = CLIPImageProcessor(
        size={"shortest_edge": shapes.SIZE},
        crop_size={"height": shapes.SIZE, "width": shapes.SIZE},
        image_mean=list(CLIP_MEAN),
        image_std=list(CLIP_STD),
    )
    return CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer)


def train_clip(images, captions, tokenizer, steps: int, batch: int, progress, seed: int):
    """Contrastive, with soft targets: captions repeat within a batch, and equal captions are all positives."""
    clip = build_clip(tokenizer)
    unique = sorted(set(captions))
    caption_index = torch.tensor([unique.index(c) for c in captions])
    unique_ids = _ids(tokenizer, unique)
    mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    pixels = ((images + 1) / 2 - mean) / std
    optimizer = torch.optim.AdamW(clip.parameters(), lr=1e-3, weight_decay=0.01)
    generator = torch.Generator().manual_seed(seed)
    for _step in range(steps):
        pick = torch.randint(len(images), (batch,), generator=generator)
        which = caption_index[pick]
        out = clip(input_ids=unique_ids[which], pixel_values=pixels[pick])
        same = (which[:, None] == which[None, :]).float()
        targets = same / same.sum(dim=1, keepdim=True)
        loss = (
            F.cross_entropy(out.logits_per_image, targets) + F.cross_entropy(out.logits_per_text, targets)
        ) / 2
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        progress.set_postfix_str(f"clip loss {loss.item():.3f}")
        progress.update()
    return clip.eval().requires_grad_(False)


def build_unet():
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=shapes.SIZE // 2,
        block_out_channels=(16, 32),
        layers_per_block=1,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=(2, 4),
        norm_num_groups=8,
    )


def build_scheduler():
    from diffusers import PNDMScheduler

    return PNDMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        steps_offset=1,
        skip_prk_steps=True,
        set_alpha_to_one=False,
        prediction_type="epsilon",
    )


def train_unet(latents, captions, text_encoder, tokenizer, steps: int, batch: int, progress, seed: int):
    """Epsilon prediction on the seen shapes, conditioned on the frozen CLIP text tower's hidden states.

    Returns the EMA of the weights, not the last step's.
    """
    from diffusers import DDPMScheduler
    from diffusers.training_utils import compute_snr

    unet = build_unet()
    ema = copy.deepcopy(unet).requires_grad_(False)
    noise_scheduler = DDPMScheduler.from_config(build_scheduler().config)
    unique = sorted(set(captions)) + [""]
    with torch.no_grad():
        states = text_encoder(_ids(tokenizer, unique)).last_hidden_state
    caption_index = torch.tensor([unique.index(c) for c in captions])
    empty = len(unique) - 1
    optimizer = torch.optim.AdamW(unet.parameters(), lr=UNET_LR, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / UNET_WARMUP))
    generator = torch.Generator().manual_seed(seed)
    for step in range(steps):
        pick = torch.randint(len(latents), (batch,), generator=generator)
        which = caption_index[pick].clone()
        which[torch.rand(batch, generator=generator) < CAPTION_DROPOUT] = empty
        x0 = latents[pick]
        noise = torch.randn(x0.shape, generator=generator)
        t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (batch,), generator=generator)
        prediction = unet(noise_scheduler.add_noise(x0, noise, t), t, states[which]).sample
        snr = compute_snr(noise_scheduler, t)
        weight = torch.clamp(snr, max=MIN_SNR_GAMMA) / snr
        loss = (F.mse_loss(prediction, noise, reduction="none").mean(dim=(1, 2, 3)) * weight).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        with torch.no_grad():  # EMA with a warm-up, so early steps are not averaged with the random init
            decay = min(EMA_DECAY, (1 + step) / (10 + step))
            for averaged, current in zip(ema.parameters(), unet.parameters()):
                averaged.lerp_(current, 1 - decay)
        progress.set_postfix_str(f"unet loss {loss.item():.4f}")
        progress.update()
    return ema.eval()


def build(target: Path, plan) -> None:
    """Pretrain all parts and save a diffusers pipeline into ``target`` (and the CLIP into target/clip)."""
    from sdsweep import warnings_filter

    warnings_filter.install()  # before transformers: its PIL image processor is what sdsweep wants
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPTextModel

    started, cpu = time.perf_counter(), time.process_time()
    torch.manual_seed(plan.seed)
    deterministic = torch.are_deterministic_algorithms_enabled()
    threads = torch.get_num_threads()
    torch.use_deterministic_algorithms(True)
    # One thread: these models are so small that a second thread mostly waits, and on a shared 2-core
    # machine two threads per process made the build about 7x slower (measured: VAE 218 s vs 30 s CPU).
    torch.set_num_threads(1)
    try:
        scenes = list(shapes.scenes(plan.num_images, plan.seed))
        images = _images(scenes)
        captions = [s.caption for s in scenes]
        tokenizer = shapes.build_tokenizer()
        total = plan.vae_steps + plan.clip_steps + plan.unet_steps
        with _BuildProgress(total) as progress:
            vae, latents = train_vae(images, plan.vae_steps, plan.vae_batch_size, progress, plan.seed)
            clip = train_clip(
                images, captions, tokenizer, plan.clip_steps, plan.batch_size, progress, plan.seed
            )
            text_encoder = CLIPTextModel(clip.config.text_config)
            text_encoder.load_state_dict(clip.text_model.state_dict())
            text_encoder.eval().requires_grad_(False)
            seen = [i for i, s in enumerate(scenes) if s.shape != shapes.HELD_OUT]
            unet = train_unet(
                latents[seen],
                [captions[i] for i in seen],
                text_encoder,
                tokenizer,
                plan.unet_steps,
                plan.batch_size,
                progress,
                plan.seed,
            )
    finally:
        torch.use_deterministic_algorithms(deterministic)
        torch.set_num_threads(threads)
    pipeline = StableDiffusionPipeline(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        scheduler=build_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipeline.save_pretrained(target, safe_serialization=True)
    clip.save_pretrained(target / "clip", safe_serialization=True)
    clip_processor(tokenizer).save_pretrained(target / "clip")
    (target / "build.json").write_text(
        f'{{"wall_seconds": {time.perf_counter() - started:.1f}, "cpu_seconds": {time.process_time() - cpu:.1f}}}\n'
    )


def ensure_shapes_model(
    flavour: str = "sd15",
    cache: str | os.PathLike | None = None,
    plan: shapes.BuildPlan | None = None,
    seed: int = 0,
) -> Path:
    """The cached build for ``seed``, building it first (minutes, with a progress bar) if it is not there.

    Seed 0 is the default build (``shapes:sd15``); another seed pretrains another model of the same world
    (``shapes:sd15@seed<N>``), for checking that a result holds across builds, not for one build only.
    """
    if flavour != "sd15":
        raise ValueError(f"Unknown shapes flavour {flavour!r}; only shapes:sd15 is built (model=shapes).")
    plan = plan or shapes.BuildPlan(seed=seed)
    shapes.ensure_concept_dataset(cache)  # data=shapes reads it; writing it takes well under a second
    return tiny._atomic_dir(shapes.model_dir(flavour, cache, seed), lambda d: build(d, plan))


def main(argv: list[str] | None = None) -> None:
    """``python -m sdsweep.models.shapes_build [--seed N]``: build (or find) the cached model and concept data."""
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m sdsweep.models.shapes_build",
        description="Build (once, minutes on a CPU) or find the pretrained shapes model and its concept data, "
        "cached under $SDSWEEP_CACHE/shapes (default ~/.cache/sdsweep/shapes).",
    )
    version = shapes.SHAPES_VERSION
    parser.add_argument(
        "--seed",
        type=int,
        default=0,
        help=f"the build's seed: 0 (default) is shapes:sd15 in sd15-v{version}/; N is shapes:sd15@seedN "
        f"in sd15-v{version}-seedN/, another model of the same world",
    )
    args = parser.parse_args(argv)
    if args.seed < 0:
        parser.error(f"--seed {args.seed}: give a whole number >= 0")
    started, cpu = time.perf_counter(), time.process_time()
    path = ensure_shapes_model(seed=args.seed)
    data = shapes.ensure_concept_dataset()
    print(
        f"shapes model {shapes.shapes_id('sd15', args.seed)}: {path}\nconcept data: {data}\n"
        f"wall {time.perf_counter() - started:.0f} s, cpu {time.process_time() - cpu:.0f} s"
    )


if __name__ == "__main__":
    main()
