"""Pixels for training: images decoded to 8-bit RGB, resized, cropped and flipped, and served by the
torch Dataset and collate function (PIL + numpy + torch; no torchvision).

Augmentation randomness (random crop, flip, a method's caption-template choice) is a pure function
of ``(seed, index, draw)`` where ``draw`` is the item's position in the training stream. The training
loader passes ``(index, draw)`` keys, so a run resumed from a checkpoint sees exactly the crops, flips
and captions an uninterrupted run saw, whatever the order or process (data-parallel rank) in which
items are fetched.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable
from io import BytesIO
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps

from sdsweep.config.resolve import resolved_resolution
from sdsweep.config.schema import Config
from sdsweep.data.examples import Example

# A dataset key: a plain index (validation, inspection: deterministic, draw 0) or (index, draw).
ItemKey = int | tuple[int, int]
# A method's caption transform: (dataset caption, generator seeded by the draw) -> training caption.
CaptionTransform = Callable[[str, random.Random], str]
CAPTION_SALT = 0xCA97_10  # keeps the caption stream apart from the flip/crop stream of the same draw


HIGH_DEPTH_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")


def to_8bit(image: Image.Image) -> Image.Image:
    """16-bit and float grayscale scaled into 0-255 (a plain convert("RGB") clips them to white).

    16-bit integers (``I;16``, and ``I`` as Pillow opens 16-bit PNGs) use the full 0-65535 range;
    floats (``F``, e.g. TIFF) in 0-1 are taken as fractions, otherwise as 0-255 values.
    """
    if image.mode not in HIGH_DEPTH_MODES:
        return image
    array = np.asarray(image, dtype=np.float64)
    if image.mode == "F":
        peak = float(np.nanmax(array)) if array.size else 0.0
        scaled = array * 255.0 if peak <= 1.0 else array
    elif image.mode.startswith("I;16") or float(array.max(initial=0)) > 255:
        scaled = array / 257.0  # 65535 -> 255
    else:
        scaled = array
    scaled = np.nan_to_num(scaled, nan=0.0)
    return Image.fromarray(np.clip(np.rint(scaled), 0, 255).astype(np.uint8), mode="L")


def open_rgb(path: Path | BytesIO) -> Image.Image:
    """The image upright (EXIF orientation applied: phone photos) and in 8-bit RGB."""
    with Image.open(path) as image:
        return to_8bit(ImageOps.exif_transpose(image)).convert("RGB")


def open_rgb_bytes(data: bytes) -> Image.Image:
    """``open_rgb`` of an image already read into memory."""
    return open_rgb(BytesIO(data))


def load_pil_images(examples: list[Example]) -> list[Image.Image]:
    return [open_rgb(example.image_path) for example in examples]


# ---- transforms --------------------------------------------------------------------------------------
def draw_seed(seed: int, index: int, draw: int) -> int:
    """A 63-bit seed for one item draw; stable across processes (no Python hash randomisation)."""
    digest = hashlib.blake2b(f"{seed}:{index}:{draw}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def split_key(key: ItemKey) -> tuple[int, int]:
    return (int(key[0]), int(key[1])) if isinstance(key, tuple) else (int(key), 0)


def transformed_caption(
    transform: CaptionTransform | None, caption: str, seed: int, index: int, draw: int
) -> str:
    """The training caption of one draw; the transform's random choices come from the draw's own seed."""
    if transform is None:
        return caption
    return transform(caption, random.Random(draw_seed(seed + CAPTION_SALT, index, draw)))


def resize_shorter_side(image: Image.Image, resolution: int) -> Image.Image:
    scale = resolution / min(image.size)
    size = (max(resolution, round(image.width * scale)), max(resolution, round(image.height * scale)))
    if size == image.size:
        return image
    # Lanczos when shrinking (no aliasing from large photos), bicubic when enlarging.
    resample = Image.Resampling.LANCZOS if scale < 1 else Image.Resampling.BICUBIC
    return image.resize(size, resample)


def crop_origin(
    size: tuple[int, int], resolution: int, center: bool, rng: random.Random | None = None
) -> tuple[int, int]:
    """(left, top) of a square crop of an image of ``size`` (width, height): centred, or from ``rng``."""
    extra_x, extra_y = size[0] - resolution, size[1] - resolution
    if center or rng is None:
        return extra_x // 2, extra_y // 2
    return rng.randint(0, extra_x), rng.randint(0, extra_y)


def crop_square(
    image: Image.Image, resolution: int, center: bool, rng: random.Random | None = None
) -> Image.Image:
    left, top = crop_origin(image.size, resolution, center, rng)
    return image.crop((left, top, left + resolution, top + resolution))


def size_conditions(
    original: tuple[int, int],
    resized: tuple[int, int],
    crop: tuple[int, int],
    origin: tuple[int, int],
    flipped: bool,
) -> torch.Tensor:
    """One sample's (original height, original width, crop top, crop left), SDXL's size conditioning.

    ``original`` and ``resized`` are (width, height) before and after resizing, ``crop`` the crop's (width,
    height) and ``origin`` its (left, top) in the resized image. A flipped crop is the mirror image: its left
    edge is measured from the other side.
    """
    left, top = origin
    if flipped:
        left = resized[0] - crop[0] - left
    return torch.tensor([original[1], original[0], top, left], dtype=torch.int64)


def resize_and_crop(
    image: Image.Image, resolution: int, center_crop: bool = True, rng: random.Random | None = None
) -> Image.Image:
    """Shorter side to ``resolution``, then a square crop (centred, or from ``rng``)."""
    return crop_square(resize_shorter_side(image.convert("RGB"), resolution), resolution, center_crop, rng)


def to_tensor(image: Image.Image) -> torch.Tensor:
    """PIL RGB -> float tensor [3, H, W] in [-1, 1], the range the VAE expects."""
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


class ImageCaptionDataset(torch.utils.data.Dataset):
    """Items ``{"pixel_values": [3, R, R] in [-1, 1], "caption": str, "index": int, "size_conditions"}``.

    Index with ``(index, draw)`` for augmented training draws; a plain index gives draw 0.
    ``size_conditions`` records each draw's original size and crop (what SDXL is conditioned on).
    """

    supports_draw_keys = True  # the training loader may pass (index, draw) keys

    def __init__(
        self,
        examples: list[Example],
        resolution: int,
        center_crop: bool = True,
        random_flip: bool = False,
        seed: int = 0,
        caption_transform: CaptionTransform | None = None,
    ):
        self.examples = list(examples)
        self.resolution = resolution
        self.center_crop = center_crop
        self.random_flip = random_flip
        self.seed = seed
        self.caption_transform = caption_transform
        # Decoded and resized once: fine-tuning sets are tens to hundreds of images, and decoding
        # per step would dominate a small model's step time.
        originals = load_pil_images(self.examples)
        self._original_sizes = [image.size for image in originals]
        resized = [resize_shorter_side(image, resolution) for image in originals]
        del originals
        self._resized_sizes = [image.size for image in resized]
        if center_crop:  # the crop never changes, so keep only the crop
            resized = [crop_square(image, resolution, center=True) for image in resized]
        self._images = resized

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, key: ItemKey) -> dict[str, Any]:
        index, draw = split_key(key)
        rng = (
            random.Random(draw_seed(self.seed, index, draw))
            if (self.random_flip or not self.center_crop)
            else None
        )
        image = self._images[index]
        resized = self._resized_sizes[index]
        origin = crop_origin(resized, self.resolution, center=self.center_crop, rng=rng)
        if not self.center_crop:
            image = image.crop(
                (origin[0], origin[1], origin[0] + self.resolution, origin[1] + self.resolution)
            )
        pixels = to_tensor(image)
        flipped = self.random_flip and rng is not None and rng.random() < 0.5
        if flipped:
            pixels = pixels.flip(-1)
        caption = transformed_caption(
            self.caption_transform, self.examples[index].caption, self.seed, index, draw
        )
        sizes = size_conditions(self._original_sizes[index], resized, (self.resolution,) * 2, origin, flipped)
        return {"pixel_values": pixels, "caption": caption, "index": index, "size_conditions": sizes}


def collate(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack tensors; ``caption`` becomes ``captions: list[str]``; ints become a tensor."""
    batch: dict[str, Any] = {}
    for key, first in items[0].items():
        values = [item[key] for item in items]
        if key == "caption":
            batch["captions"] = values
        elif isinstance(first, torch.Tensor):
            batch[key] = torch.stack(values)
        elif isinstance(first, int):
            batch[key] = torch.tensor(values)
        else:
            batch[key] = values
    return batch


def dataset_for(
    cfg: Config, examples: list[Example], caption_transform: CaptionTransform | None = None
) -> ImageCaptionDataset:
    """The pixel dataset with the configured resolution, crop, flip and seed."""
    return ImageCaptionDataset(
        examples,
        resolved_resolution(cfg),
        center_crop=cfg.data.center_crop,
        random_flip=cfg.data.random_flip,
        seed=cfg.train.seed,
        caption_transform=caption_transform,
    )
