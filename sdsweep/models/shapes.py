"""A known-answer world: coloured shapes on a plain background, and a small Stable Diffusion pretrained on it.

The world is procedural (``draw``/``sample``), so the right answer for any prompt is known exactly and
``sdsweep.evaluation.judge`` can check a generated image without CLIP. ``ensure_shapes_model`` builds, once and
deterministically, an SD-1.5-layout pipeline whose parts were trained here: a VAE that reconstructs
shapes, a CLIP text+vision pair trained contrastively (its text tower is also the UNet's text encoder, so
the word "star" exists), and a UNet that has seen every shape except the held-out one (the star).
It is cached under ``$SDSWEEP_CACHE/shapes`` and loads through ``from_pretrained`` like a hub model.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from sdsweep.config.shapes_ids import SHAPES_PREFIX, parse_shapes_build, shapes_id  # noqa: F401
from sdsweep.models import tiny

SHAPES_VERSION = "3"  # bump when the world or the build below changes, so cached copies are rebuilt
SIZE = 32  # pixels; the VAE halves it, so latents are 16x16
SUPERSAMPLE = 4  # draw at 4x and downsample, for anti-aliased edges
BACKGROUND = (250, 250, 250)
COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 70, 220),
    "yellow": (235, 200, 30),
}
SHAPES = ("circle", "square", "triangle", "star")
HELD_OUT = "star"  # the UNet never sees it during pretraining; CLIP does
# One large centred shape per image: a 2-core CPU build has to learn shapes, not layouts, within minutes;
# large shapes (half the image) also survive the VAE's 2x downsampling with crisp edges.
SIZES = (16, 20)  # side of the shape's bounding square, pixels, inclusive
JITTER = 2  # the centre moves up to this many pixels each way
_WORDS = "a on the in " + " ".join(SHAPES) + " " + " ".join(COLOURS) + " photo of"


@dataclass(frozen=True)
class Scene:
    shape: str
    colour: str
    size: int  # side of the shape's bounding square, pixels
    dx: int  # jitter of the centre, pixels
    dy: int

    @property
    def caption(self) -> str:
        return f"a {self.colour} {self.shape}"

    @property
    def box(self) -> tuple[float, float, float, float]:
        cx, cy = SIZE / 2 + self.dx, SIZE / 2 + self.dy
        half = self.size / 2
        return (cx - half, cy - half, cx + half, cy + half)


def _unit_polygon(shape: str) -> list[tuple[float, float]]:
    """The shape's outline in the unit square, touching all four sides (so a box fits it exactly)."""
    if shape == "triangle":
        return [(0.5, 0.0), (1.0, 1.0), (0.0, 1.0)]
    if shape == "star":  # five points, point up, inner radius 0.45 of the outer
        angles = np.pi / 2 + np.arange(10) * np.pi / 5
        radii = np.where(np.arange(10) % 2 == 0, 1.0, 0.45)
        xs, ys = radii * np.cos(angles), -radii * np.sin(angles)
        xs = (xs - xs.min()) / (xs.max() - xs.min())
        ys = (ys - ys.min()) / (ys.max() - ys.min())
        return list(zip(xs.tolist(), ys.tolist()))
    return [(0.0, 0.0), (1.0, 0.0), (1.0, 1.0), (0.0, 1.0)]  # square


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, box, fill, scale: float = 1.0) -> None:
    x0, y0, x1, y1 = (v * scale for v in box)
    if shape == "circle":
        draw.ellipse([x0, y0, x1, y1], fill=fill)
    else:
        draw.polygon([(x0 + u * (x1 - x0), y0 + v * (y1 - y0)) for u, v in _unit_polygon(shape)], fill=fill)


def draw(scene: Scene) -> Image.Image:
    big = Image.new("RGB", (SIZE * SUPERSAMPLE, SIZE * SUPERSAMPLE), BACKGROUND)
    _draw_shape(ImageDraw.Draw(big), scene.shape, scene.box, COLOURS[scene.colour], SUPERSAMPLE)
    return big.resize((SIZE, SIZE), Image.BOX)


def shape_mask(shape: str, box: tuple[int, int, int, int]) -> np.ndarray:
    """A SIZE x SIZE boolean template of ``shape`` filling ``box`` (x0, y0, x1, y1), for the judge."""
    big = Image.new("L", (SIZE * SUPERSAMPLE, SIZE * SUPERSAMPLE), 0)
    _draw_shape(ImageDraw.Draw(big), shape, box, 255, SUPERSAMPLE)
    return np.asarray(big.resize((SIZE, SIZE), Image.BOX)) >= 128


def sample(rng: np.random.Generator, shapes: tuple[str, ...] = SHAPES) -> Scene:
    return Scene(
        shape=shapes[int(rng.integers(len(shapes)))],
        colour=list(COLOURS)[int(rng.integers(len(COLOURS)))],
        size=int(rng.integers(SIZES[0], SIZES[1] + 1)),
        dx=int(rng.integers(-JITTER, JITTER + 1)),
        dy=int(rng.integers(-JITTER, JITTER + 1)),
    )


def scenes(count: int, seed: int, shapes: tuple[str, ...] = SHAPES) -> Iterator[Scene]:
    rng = np.random.default_rng(seed)
    for _ in range(count):
        yield sample(rng, shapes)


def seen_shapes() -> tuple[str, ...]:
    return tuple(s for s in SHAPES if s != HELD_OUT)


# ---- data folders ------------------------------------------------------------------------------------------
def concept_scenes(num_images: int, seed: int) -> list[Scene]:
    """The held-out shape in every colour in turn (size and jitter drawn from ``seed``).

    Balanced on purpose: with colours drawn at random, 12 images held 2 red stars, and the fine-tuned model
    drew "a red star" orange (the yellow stars' colour bled into it), which the judge rightly calls wrong.
    """
    colours = list(COLOURS)
    return [
        replace(scene, colour=colours[i % len(colours)])
        for i, scene in enumerate(scenes(num_images, seed, (HELD_OUT,)))
    ]


def write_concept_dataset(directory: str | os.PathLike, num_images: int = 16, seed: int = 7) -> Path:
    """An imagefolder (PNG + metadata.jsonl) of the held-out concept, for fine-tuning it in."""

    def write(d: Path) -> None:
        with open(d / "metadata.jsonl", "w") as f:
            for i, scene in enumerate(concept_scenes(num_images, seed)):
                name = f"{i:03d}.png"
                draw(scene).save(d / name)
                f.write(json.dumps({"file_name": name, "text": scene.caption}) + "\n")

    return tiny._atomic_dir(Path(directory), write)


def concept_data_dir(cache: str | os.PathLike | None = None) -> Path:
    """Where ``conf/data/shapes.yaml`` expects the concept images (``$SDSWEEP_CACHE/shapes/data``)."""
    return tiny.cache_root(cache) / "shapes" / f"data-v{SHAPES_VERSION}"


def ensure_concept_dataset(cache: str | os.PathLike | None = None) -> Path:
    return write_concept_dataset(concept_data_dir(cache))


# ---- tokenizer ---------------------------------------------------------------------------------------------
def build_tokenizer():
    """A CLIP BPE tokenizer whose merges make every word of the world (and tiny's corpus) one token."""
    from transformers import CLIPTokenizer

    symbols = tiny._byte_symbols()
    vocab: dict[str, int] = {}
    for s in symbols + [s + "</w>" for s in symbols]:
        vocab.setdefault(s, len(vocab))
    merges: list[tuple[str, str]] = []
    words = Counter((_WORDS + " " + tiny._CORPUS).split())
    for word in sorted(words, key=lambda w: (-len(w), w)):  # long words first, so their merges win
        parts = list(word[:-1]) + [word[-1] + "</w>"]
        left = parts[0]
        for right in parts[1:]:
            if (left, right) not in merges:
                merges.append((left, right))
            vocab.setdefault(left + right, len(vocab))
            left = left + right
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)


# ---- the one-time build --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class BuildPlan:
    """Step counts and batch sizes of the pretraining; the defaults fit ~10 minutes on 2 CPU cores."""

    vae_steps: int = 300
    vae_batch_size: int = 16
    # CLIP has to tell shapes apart, not only colours: after 100 steps it named the shape of 69% of world
    # images and scored a red triangle 79 against "a red star" (a star: 87), so CLIP score could not see
    # the star being learned. After 1000 steps (about 40 s): 99.8% and 43 against 95.
    clip_steps: int = 1000
    unet_steps: int = 2000
    batch_size: int = 32
    num_images: int = 2000
    seed: int = 0


def model_dir(flavour: str = "sd15", cache: str | os.PathLike | None = None, seed: int = 0) -> Path:
    """The build's cache folder: ``sd15-v3`` for seed 0 (today's build), ``sd15-v3-seed<N>`` for seed N."""
    suffix = f"-seed{seed}" if seed else ""
    return tiny.cache_root(cache) / "shapes" / f"{flavour}-v{SHAPES_VERSION}{suffix}"


def clip_dir(cache: str | os.PathLike | None = None, seed: int = 0) -> Path:
    """The shapes CLIP (eval.clip_model=shapes:sd15[@seed<N>]) is saved inside the model folder, under clip/."""
    return model_dir("sd15", cache, seed) / "clip"


def parse_shapes_model_id(pretrained: str) -> tuple[str, int] | None:
    """``shapes:sd15`` -> ("sd15", 0); ``shapes:sd15@seed3`` -> ("sd15", 3); anything else -> None."""
    return parse_shapes_build(pretrained)


def parse_shapes_id(pretrained: str) -> str | None:
    """``shapes:sd15`` (or ``shapes:sd15@seed3``) -> ``sd15``; anything else -> None."""
    build = parse_shapes_build(pretrained)
    return None if build is None else build[0]


def resolve_clip(name: str, cache: str | os.PathLike | None = None) -> str | None:
    """The clip/ folder of the shapes build that eval.clip_model names (``shapes:sd15@seed3``); None if no id."""
    build = parse_shapes_build(name)
    return None if build is None else str(clip_dir(cache, build[1]))
