"""Ground truth for the shapes world: an exact geometric detector, not CLIP.

Deterministic and untrained: segment what differs from the plain background, take the largest blob, name
its colour by the nearest palette colour of its mean, and its shape by the best overlap (IoU) with each
shape's template fitted to the blob's bounding box. ``judge_prompts`` turns a batch of generated images
and the prompts that asked for them into ``truth/concept_accuracy`` and ``truth/prior_accuracy``.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image

from sdsweep.models import shapes as world

FOREGROUND_DISTANCE = 60.0  # RGB distance from the background that counts as "drawn"
MIN_BLOB_PIXELS = 12  # smaller blobs (at 32 px) are noise, not a shape
MAX_COLOUR_DISTANCE = 110.0  # a blob whose mean is this far from every palette colour has no colour
MAX_SHAPE_SIDE = 27  # world shapes are at most 20 px across; a blob much larger is no shape
MIN_SHAPE_IOU = 0.55  # a blob that overlaps no template this well has no shape
_PLACEHOLDER = re.compile(r"^<[^>]+>$")  # a textual-inversion token such as <star>


@dataclass(frozen=True)
class Verdict:
    shape: str | None  # None: nothing recognisable
    colour: str | None
    iou: float  # overlap with the chosen shape's template


@dataclass(frozen=True)
class Asked:
    shape: str | None
    colour: str | None
    concept: bool  # the held-out concept (by name or by a placeholder token)


def _largest_blob(mask: np.ndarray) -> np.ndarray:
    """The largest 4-connected component of a boolean mask (iterative flood fill; images are tiny)."""
    labels = np.zeros(mask.shape, dtype=np.int32)
    best, best_size, label = None, 0, 0
    height, width = mask.shape
    for y0, x0 in zip(*np.nonzero(mask)):
        if labels[y0, x0]:
            continue
        label += 1
        labels[y0, x0] = label
        stack, size = [(y0, x0)], 0
        while stack:
            y, x = stack.pop()
            size += 1
            for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= ny < height and 0 <= nx < width and mask[ny, nx] and not labels[ny, nx]:
                    labels[ny, nx] = label
                    stack.append((ny, nx))
        if size > best_size:
            best, best_size = label, size
    return labels == best if best is not None else np.zeros_like(mask)


def judge_image(image: Image.Image) -> Verdict:
    """What a single image shows: its main shape and that shape's colour."""
    pixels = np.asarray(
        image.convert("RGB").resize((world.SIZE, world.SIZE), Image.BILINEAR), dtype=np.float32
    )
    border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
    background = np.median(border, axis=0)
    mask = np.linalg.norm(pixels - background, axis=-1) > FOREGROUND_DISTANCE
    blob = _largest_blob(mask)
    if blob.sum() < MIN_BLOB_PIXELS:
        return Verdict(None, None, 0.0)
    mean = pixels[blob].mean(axis=0)
    names = list(world.COLOURS)
    distances = [float(np.linalg.norm(mean - np.array(world.COLOURS[n]))) for n in names]
    colour = names[int(np.argmin(distances))] if min(distances) <= MAX_COLOUR_DISTANCE else None
    ys, xs = np.nonzero(blob)
    box = (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)
    if max(box[2] - box[0], box[3] - box[1]) > MAX_SHAPE_SIDE:
        return Verdict(None, colour, 0.0)  # noise or a smear over the whole image, not a shape of this world
    scores = {}
    for shape in world.SHAPES:
        template = world.shape_mask(shape, box)
        union = np.logical_or(template, blob).sum()
        scores[shape] = float(np.logical_and(template, blob).sum() / union) if union else 0.0
    shape = max(scores, key=scores.get)
    if scores[shape] < MIN_SHAPE_IOU:
        return Verdict(None, colour, scores[shape])
    return Verdict(shape, colour, scores[shape])


def parse_prompt(prompt: str, held_out: str = world.HELD_OUT) -> Asked:
    """The shape and colour a prompt asks for; a placeholder token (<star>) stands for the held-out shape."""
    words = prompt.lower().replace(",", " ").split()
    placeholder = any(_PLACEHOLDER.match(w) for w in words)
    shapes = [w for w in words if w in world.SHAPES]
    colours = [w for w in words if w in world.COLOURS]
    shape = held_out if placeholder else (shapes[0] if shapes else None)
    return Asked(shape, colours[0] if colours else None, concept=shape == held_out)


def judge_prompts(
    images: Sequence[Image.Image], prompts: Sequence[str], held_out: str = world.HELD_OUT
) -> dict:
    """``truth/concept_accuracy`` over prompts asking for the held-out shape, ``truth/prior_accuracy`` over the rest.

    An image is right when it shows the asked shape in the asked colour (a prompt naming no colour accepts
    any). A group with no prompts is left out rather than reported as 0.
    """
    hits: dict[str, list[bool]] = {"concept": [], "prior": []}
    for group, right in judge_each(images, prompts, held_out):
        if group is not None:
            hits[group].append(bool(right))
    return {f"truth/{group}_accuracy": float(np.mean(v)) for group, v in hits.items() if v}


def judge_each(
    images: Sequence[Image.Image], prompts: Sequence[str], held_out: str = world.HELD_OUT
) -> list[tuple[str | None, float | None]]:
    """Per image: (``concept``/``prior``, 1.0 right / 0.0 wrong), or (None, None) for a prompt outside the world
    (e.g. "a photo of sks"), which has no ground truth. The per-unit values of ``judge_prompts``."""
    if len(images) != len(prompts):
        raise ValueError(
            f"judge_prompts needs one prompt per image ({len(images)} images, {len(prompts)} prompts)"
        )
    out: list[tuple[str | None, float | None]] = []
    for image, prompt in zip(images, prompts):
        asked = parse_prompt(prompt, held_out)
        if asked.shape is None:
            out.append((None, None))
            continue
        verdict = judge_image(image)
        right = verdict.shape == asked.shape and (asked.colour is None or verdict.colour == asked.colour)
        out.append(("concept" if asked.concept else "prior", float(right)))
    return out


JUDGES = {"shapes": judge_each}  # eval.judge value -> the world's per-image judge


def judge_units(
    name: str, images: Sequence[Image.Image], prompts: Sequence[str]
) -> list[tuple[str | None, float | None]]:
    """The hook the evaluator calls when ``eval.judge`` is set: per image, (truth group, 1.0/0.0 or None);
    the unit table turns them into ``truth/{group}_accuracy`` with intervals."""
    if name not in JUDGES:
        raise ValueError(f"eval.judge={name!r} is not a known world; use one of {sorted(JUDGES)} or null.")
    return JUDGES[name](images, prompts)
