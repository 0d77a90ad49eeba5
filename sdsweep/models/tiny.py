"""Offline tiny models and demo data.

Everything here is built from code with fixed seeds, so the demo, the tests and CI never touch a hub.
The tiny models keep the real architectures (UNet2DConditionModel, AutoencoderKL, CLIPTextModel) so the
same training, saving and loading code paths run as for full-size Stable Diffusion.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from sdsweep import io

TINY_PREFIX = "tiny:"
FLAVOURS = ("sd15", "sd21", "sdxl")
TINY_VERSION = "3"  # bump when the architecture below changes, so cached copies are rebuilt

# Words the tiny tokenizer learns as whole tokens: prompts in conf/, tests and the demo captions.
_CORPUS = (
    "a photo of sks person dog cat painting style in the van gogh on red green blue yellow white black "
    "background circle square triangle thumbs up giving an astronaut oil portrait castle picture rendering "
    "close-up bright dark small large object toy"
)
_COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (40, 70, 220),
    "yellow": (230, 210, 40),
    "white": (240, 240, 240),
}
_SHAPES = ("circle", "square", "triangle")


def _byte_symbols() -> list[str]:
    """The 256 printable stand-ins for bytes used by GPT-2/CLIP byte-level BPE."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    codes = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + extra)
            extra += 1
    return [chr(c) for c in codes]


def write_tiny_tokenizer_files(directory: Path) -> Path:
    """A CLIP BPE vocabulary whose merges make every corpus word a single token."""
    symbols = _byte_symbols()
    vocab: dict[str, int] = {}
    for s in symbols:
        vocab.setdefault(s, len(vocab))
    for s in symbols:
        vocab.setdefault(s + "</w>", len(vocab))
    merges: list[tuple[str, str]] = []
    seen: set[tuple[str, str]] = set()
    words = Counter(_CORPUS.split())
    for word in sorted(words, key=lambda w: (-len(w), w)):  # long words first, so their merges win
        parts = list(word[:-1]) + [word[-1] + "</w>"]
        left = parts[0]
        for right in parts[1:]:
            pair = (left, right)
            merged = left + right
            if pair not in seen:
                seen.add(pair)
                merges.append(pair)
            vocab.setdefault(merged, len(vocab))
            left = merged
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "vocab.json").write_text(json.dumps(vocab))
    (directory / "merges.txt").write_text("#version: 0.2\n" + "\n".join(f"{a} {b}" for a, b in merges) + "\n")
    return directory


def build_tiny_tokenizer():
    from transformers import CLIPTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        files = write_tiny_tokenizer_files(Path(tmp))
        vocab = json.loads((files / "vocab.json").read_text())
        merges = [tuple(line.split()) for line in (files / "merges.txt").read_text().splitlines()[1:] if line]
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)


def tiny_text_config(tokenizer, **extra):
    """The CLIP text tower shared by the tiny SD text encoder and the tiny CLIP (hidden 32, 2 layers)."""
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **extra,
    )


def build_tiny_vae(seed: int, **extra):
    """The tiny models' VAE (32 px images, 4 latent channels), its random weights drawn from ``seed``; ``extra``
    overrides a config value (SDXL's latent scale)."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        block_out_channels=(32, 64),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=4,
        norm_num_groups=32,
        sample_size=32,
        **extra,
    )


def build_tiny_pipeline(flavour: str = "sd15", seed: int = 0):
    """A random-weight StableDiffusionPipeline with SD-1.5 or SD-2.1 layout (about 1.7 M parameters)."""
    from diffusers import PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    if flavour == "sdxl":
        return build_tiny_sdxl_pipeline(seed)
    if flavour not in FLAVOURS:
        raise ValueError(
            f"Unknown tiny flavour {flavour!r}; use one of {FLAVOURS} (e.g. model.pretrained=tiny:sd15)."
        )
    sd21 = flavour == "sd21"
    tokenizer = build_tiny_tokenizer()
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=16,
        block_out_channels=(32, 64),
        layers_per_block=1,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=(2, 4),
        norm_num_groups=32,
        use_linear_projection=sd21,
        upcast_attention=sd21,
    )
    vae = build_tiny_vae(seed + 1)
    torch.manual_seed(seed + 2)
    text_encoder = CLIPTextModel(tiny_text_config(tokenizer, projection_dim=32))
    scheduler = PNDMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        steps_offset=1,
        skip_prk_steps=True,
        set_alpha_to_one=False,
        prediction_type="v_prediction" if sd21 else "epsilon",
    )
    return StableDiffusionPipeline(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def build_tiny_sdxl_pipeline(seed: int = 0):
    """A random-weight StableDiffusionXLPipeline (about 1.1 M parameters), SDXL's layout in miniature.

    Two text encoders (the second with a projection, as OpenCLIP bigG in SDXL) whose hidden states
    concatenate to the UNet's 64-wide cross-attention input; a UNet with ``addition_embed_type="text_time"``
    taking the second encoder's pooled embedding (32) and the six size/crop numbers (8 each) as added
    conditions; SDXL's linear projections; an Euler sampler, as SDXL ships with.
    """
    from diffusers import (
        EulerDiscreteScheduler,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    tokenizer, tokenizer_2 = build_tiny_tokenizer(), build_tiny_tokenizer()
    pooled_dim, time_dim = 32, 8
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=16,
        block_out_channels=(32, 64),
        layers_per_block=1,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=64,  # two 32-wide encoders, concatenated
        attention_head_dim=(2, 4),
        norm_num_groups=32,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=time_dim,
        projection_class_embeddings_input_dim=pooled_dim + 6 * time_dim,
    )
    vae = build_tiny_vae(seed + 1, scaling_factor=0.13025)  # SDXL's VAE scale
    torch.manual_seed(seed + 2)
    text_encoder = CLIPTextModel(tiny_text_config(tokenizer, projection_dim=pooled_dim))
    torch.manual_seed(seed + 3)
    text_encoder_2 = CLIPTextModelWithProjection(
        tiny_text_config(tokenizer_2, projection_dim=pooled_dim, hidden_act="gelu")
    )
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        steps_offset=1,
        timestep_spacing="leading",
        prediction_type="epsilon",
    )
    return StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=unet,
        scheduler=scheduler,
    )


def _atomic_dir(target: Path, write) -> Path:
    """Build a folder next to its final place and rename it in, so readers never see half of it.

    Processes that want the same build at once (workers of one machine, test processes sharing a cache)
    wait on a lock and reuse the first one's folder instead of each spending minutes on an identical build."""
    if (target / ".complete").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with io.file_lock(target.with_name(f".{target.name}.lock")):
        if (target / ".complete").exists():
            return target
        return _build_dir(target, write)


def _build_dir(target: Path, write) -> Path:
    staging = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
    os.chmod(staging, io.DIR_MODE)  # mkdtemp makes it 0700; a shared $SDSWEEP_CACHE must stay readable
    write(staging)
    (staging / ".complete").write_text("ok")
    try:
        os.replace(staging, target)
    except OSError:  # another process won the race; its copy is identical
        import shutil

        shutil.rmtree(staging, ignore_errors=True)
    return target


def cache_root(cache: str | os.PathLike | None = None) -> Path:
    return Path(os.path.expanduser(str(cache or os.environ.get("SDSWEEP_CACHE", "~/.cache/sdsweep"))))


def file_hash_cache(cache: str | os.PathLike | None = None) -> Path:
    """The machine's one cache of file hashes (by resolved path, size and mtime), shared by the study
    fingerprint, the latent cache and the evaluation's reference set, so each file is hashed once."""
    return cache_root(cache) / "file-hashes.json"


def ensure_tiny_model(flavour: str = "sd15", cache: str | os.PathLike | None = None) -> Path:
    """A saved diffusers folder for the tiny model, so it loads through ``from_pretrained`` like a real one."""
    target = cache_root(cache) / "tiny" / f"{flavour}-v{TINY_VERSION}"
    return _atomic_dir(
        target, lambda d: build_tiny_pipeline(flavour).save_pretrained(d, safe_serialization=True)
    )


def build_tiny_clip(seed: int = 0):
    """A random CLIPModel + CLIPProcessor with 32 px images, for CLIP score and image features offline."""
    from transformers import (
        CLIPConfig,
        CLIPImageProcessor,
        CLIPModel,
        CLIPProcessor,
        CLIPVisionConfig,
    )

    tokenizer = build_tiny_tokenizer()
    config = CLIPConfig(
        text_config=tiny_text_config(tokenizer).to_dict(),
        vision_config=CLIPVisionConfig(
            hidden_size=32,
            intermediate_size=37,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=32,
            patch_size=8,
        ).to_dict(),
        projection_dim=32,
    )
    torch.manual_seed(seed)
    model = CLIPModel(config).eval()
    # Random towers give random (often negative) text-image cosines, and CLIP score clips at 0. A shared
    # direction in both towers' outputs keeps cosines positive while images still move the score.
    with torch.no_grad():
        shared = torch.randn(config.text_config.hidden_size)
        model.text_projection.weight.copy_(model.visual_projection.weight)
        model.text_model.final_layer_norm.bias.copy_(shared)
        model.vision_model.post_layernorm.bias.copy_(shared)
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": 32},
        crop_size={"height": 32, "width": 32},
        do_center_crop=True,
    )
    processor = CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer)
    return model, processor


def ensure_tiny_clip(cache: str | os.PathLike | None = None) -> Path:
    return _ensure_saved_model(cache, "clip", build_tiny_clip)


def build_tiny_dino(seed: int = 0):
    """A random ViTModel + ViTImageProcessor with 32 px images: DINO's architecture, for eval/dino offline."""
    from transformers import ViTConfig, ViTImageProcessor, ViTModel

    config = ViTConfig(
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=32,
        patch_size=8,
    )
    torch.manual_seed(seed)
    model = ViTModel(config, add_pooling_layer=False).eval()
    processor = ViTImageProcessor(size={"height": 32, "width": 32})
    return model, processor


def ensure_tiny_dino(cache: str | os.PathLike | None = None) -> Path:
    return _ensure_saved_model(cache, "dino", build_tiny_dino)


def _ensure_saved_model(cache: str | os.PathLike | None, name: str, build) -> Path:
    """``$SDSWEEP_CACHE/tiny/<name>-v<version>``: a (model, processor) pair from ``build``, saved once."""

    def write(d: Path) -> None:
        model, processor = build()
        model.save_pretrained(d, safe_serialization=True)
        processor.save_pretrained(d)

    return _atomic_dir(cache_root(cache) / "tiny" / f"{name}-v{TINY_VERSION}", write)


def _draw_demo_image(index: int, size: int, rng: np.random.Generator) -> tuple[Image.Image, str]:
    background = list(_COLOURS)[index % len(_COLOURS)]
    shape = _SHAPES[(index // len(_COLOURS)) % len(_SHAPES)]
    base = np.array(_COLOURS[background], dtype=np.float32)
    noise = rng.normal(0, 12, size=(size, size, 3))
    pixels = np.clip(base + noise, 0, 255).astype(np.uint8)
    image = Image.fromarray(pixels)
    draw = ImageDraw.Draw(image)
    # The "subject": a dark shape with a yellow dot, which the trigger word is bound to.
    lo, hi = size // 4 + int(rng.integers(-2, 3)), 3 * size // 4 + int(rng.integers(-2, 3))
    if shape == "circle":
        draw.ellipse([lo, lo, hi, hi], fill=(30, 30, 30))
    elif shape == "square":
        draw.rectangle([lo, lo, hi, hi], fill=(30, 30, 30))
    else:
        draw.polygon([(size // 2, lo), (lo, hi), (hi, hi)], fill=(30, 30, 30))
    centre = size // 2
    draw.ellipse([centre - 2, centre - 2, centre + 2, centre + 2], fill=_COLOURS["yellow"])
    return image, f"a photo of sks {shape} on a {background} background"


def write_demo_dataset(
    directory: str | os.PathLike, num_images: int = 10, size: int = 64, seed: int = 0
) -> Path:
    """An imagefolder (PNG files + metadata.jsonl) of synthetic subjects captioned with the trigger word ``sks``."""
    directory = Path(directory)

    def write(d: Path) -> None:
        rng = np.random.default_rng(seed)
        with open(d / "metadata.jsonl", "w") as f:
            for i in range(num_images):
                image, caption = _draw_demo_image(i, size, rng)
                name = f"{i:03d}.png"
                image.save(d / name)
                f.write(json.dumps({"file_name": name, "text": caption}) + "\n")

    return _atomic_dir(directory, write)


def ensure_demo_dataset(num_images: int = 10, cache: str | os.PathLike | None = None) -> Path:
    return write_demo_dataset(cache_root(cache) / "data" / f"demo-{num_images}-v{TINY_VERSION}", num_images)


def parse_tiny_id(pretrained: str) -> str | None:
    """``tiny:sd21`` -> ``sd21``; anything else -> None."""
    if pretrained.startswith(TINY_PREFIX):
        return pretrained[len(TINY_PREFIX) :] or "sd15"
    return None
