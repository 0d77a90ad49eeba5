"""Image-caption datasets and transforms (PIL + numpy + torch; no torchvision).

Every image is opened and verified when the dataset is listed, so a missing or corrupt file is
reported by name before any model is loaded.

Augmentation randomness (random crop, flip) is a pure function of ``(seed, index, draw)`` where
``draw`` is the item's position in the training stream. The training loader passes ``(index, draw)``
keys, so a run resumed from a checkpoint sees exactly the crops and flips an uninterrupted run saw,
whatever the order or process in which items are fetched.
"""

from __future__ import annotations

import csv
import hashlib
import json
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from sdsweep.config import Config, resolved_resolution

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
IMAGE_COLUMNS = ("file_name", "image", "image_file", "path", "filename")
CAPTION_COLUMNS = ("text", "caption", "prompt", "captions")
METADATA_FILES = ("metadata.jsonl", "metadata.csv")

# A dataset key: a plain index (validation, inspection: deterministic, draw 0) or (index, draw).
ItemKey = int | tuple[int, int]


class DataError(ValueError):
    """The training data cannot be used; the message names the file or column and the fix."""


@dataclass(frozen=True)
class Example:
    image_path: Path
    caption: str


# ---- listing ---------------------------------------------------------------------------------------
def _read_rows(folder: Path) -> tuple[list[dict[str, Any]], Path]:
    jsonl = folder / "metadata.jsonl"
    if jsonl.exists():
        rows = []
        for number, line in enumerate(jsonl.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise DataError(
                    f"{jsonl} line {number} is not valid JSON ({error.msg}); fix or remove that line."
                ) from None
            if not isinstance(row, dict):
                raise DataError(f"{jsonl} line {number} is not a JSON object; write one {{...}} per image.")
            rows.append(row)
        return rows, jsonl
    table = folder / "metadata.csv"
    if table.exists():
        with open(table, newline="", encoding="utf-8") as f:
            return list(csv.DictReader(f)), table
    has_images = any(p.suffix.lower() in IMAGE_SUFFIXES for p in folder.iterdir())
    hint = (
        " The folder holds images without captions: use data=instances with data.instance_prompt='a photo of sks dog'."
        if has_images
        else ""
    )
    raise DataError(
        f"No metadata.jsonl or metadata.csv in {folder}. Add one with a line per image, e.g. "
        '{"file_name": "001.png", "text": "a photo of sks dog"}.' + hint
    )


def _pick_column(
    columns: list[str], wanted: str | None, candidates: tuple[str, ...], what: str, source: Path
) -> str:
    if wanted:
        if wanted not in columns:
            raise DataError(
                f"The {what} column '{wanted}' (data.{what}_column) is not in {source}; its columns are "
                f"{columns}. Set data.{what}_column to one of them, or leave it unset to detect it."
            )
        return wanted
    for name in candidates:
        if name in columns:
            return name
    raise DataError(
        f"Could not find the {what} column in {source}: looked for {list(candidates)}, found {columns}. "
        f"Set data.{what}_column=<name>."
    )


def _caption_of(value: Any, row_number: int, source: Path, fallback: str | None) -> str:
    # Several captions per image (a list): the first is used, so captions (and their cached text
    # embeddings) stay fixed per image.
    if isinstance(value, list):
        value = value[0] if value else None
    if value is None or (isinstance(value, str) and not value.strip()):
        if fallback is not None:
            return fallback
        raise DataError(
            f"Row {row_number} of {source} has no caption. Fill it in, or set data.instance_prompt to use one "
            "prompt for uncaptioned images."
        )
    return str(value)


def _imagefolder_examples(folder: Path, cfg: Config) -> list[Example]:
    rows, source = _read_rows(folder)
    if not rows:
        raise DataError(f"{source} lists no images; add at least one line.")
    columns = list(dict.fromkeys(key for row in rows for key in row))
    image_column = _pick_column(columns, cfg.data.image_column, IMAGE_COLUMNS, "image", source)
    caption_column = _pick_column(columns, cfg.data.caption_column, CAPTION_COLUMNS, "caption", source)
    examples = []
    for number, row in enumerate(rows, 1):
        name = row.get(image_column)
        if not name:
            raise DataError(
                f"Row {number} of {source} has no '{image_column}' value; give the image's file name."
            )
        path = Path(str(name)).expanduser()
        path = path if path.is_absolute() else folder / path
        caption = _caption_of(row.get(caption_column), number, source, cfg.data.instance_prompt)
        examples.append(Example(path, caption))
    return examples


def _instance_examples(folder: Path, cfg: Config) -> list[Example]:
    if not cfg.data.instance_prompt:
        raise DataError(
            "data=instances needs data.instance_prompt, e.g. data.instance_prompt='a photo of sks dog'."
        )
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    return [Example(p, cfg.data.instance_prompt) for p in files]


def verify_image(path: Path) -> None:
    """Raise DataError unless ``path`` is a readable image (header check and a full decode)."""
    if not path.is_file():
        raise DataError(f"Image not found: {path}. Fix the path in the metadata or add the file.")
    try:
        with Image.open(path) as image:
            image.verify()  # structure and checksums; the image is unusable afterwards
        with Image.open(path) as image:
            image.load()  # truncated pixel data only shows on a full decode
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        raise DataError(f"Image {path} is corrupt or not an image ({error}). Replace or remove it.") from None


def load_examples(cfg: Config) -> list[Example]:
    """The configured dataset as (image, caption) pairs, every image verified."""
    if cfg.data.kind == "demo":
        from sdsweep import tiny

        folder = tiny.ensure_demo_dataset(cfg.data.demo_num_images, cfg.paths.cache)
    else:
        folder = Path(str(cfg.data.path)).expanduser()
        if not folder.is_dir():
            raise DataError(
                f"data.path={cfg.data.path} is not a folder. Point data.path at the folder holding your images."
            )
    if cfg.data.kind == "instances":
        examples = _instance_examples(folder, cfg)
    else:
        examples = _imagefolder_examples(folder, cfg)
    if not examples:
        raise DataError(
            f"The dataset in {folder} is empty: no images found (looked for {list(IMAGE_SUFFIXES)}). "
            "Add images or point data.path elsewhere."
        )
    for example in examples:
        verify_image(example.image_path)
    return examples


def split_examples(examples: list[Example], num_heldout: int) -> tuple[list[Example], list[Example]]:
    """A fixed pseudo-random ``num_heldout`` images are held out; the rest keep their order for training."""
    if num_heldout < 0:
        raise DataError(f"data.num_heldout={num_heldout} is negative; use 0 or more.")
    if len(examples) - num_heldout < 1:
        raise DataError(
            f"data.num_heldout={num_heldout} leaves no training images out of {len(examples)}; "
            "lower data.num_heldout or add images."
        )
    order = list(range(len(examples)))
    random.Random(0).shuffle(order)  # a constant seed: every trial of a study holds out the same images
    heldout_ids = set(order[len(order) - num_heldout :]) if num_heldout else set()
    train = [e for i, e in enumerate(examples) if i not in heldout_ids]
    heldout = [e for i, e in enumerate(examples) if i in heldout_ids]
    return train, heldout


def open_rgb(path: Path) -> Image.Image:
    """The image upright (EXIF orientation applied: phone photos) and in RGB."""
    with Image.open(path) as image:
        return ImageOps.exif_transpose(image).convert("RGB")


def load_pil_images(examples: list[Example]) -> list[Image.Image]:
    return [open_rgb(example.image_path) for example in examples]


# ---- transforms --------------------------------------------------------------------------------------
def draw_seed(seed: int, index: int, draw: int) -> int:
    """A 63-bit seed for one item draw; stable across processes (no Python hash randomisation)."""
    digest = hashlib.blake2b(f"{seed}:{index}:{draw}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def split_key(key: ItemKey) -> tuple[int, int]:
    return (int(key[0]), int(key[1])) if isinstance(key, tuple) else (int(key), 0)


def resize_shorter_side(image: Image.Image, resolution: int) -> Image.Image:
    scale = resolution / min(image.size)
    size = (max(resolution, round(image.width * scale)), max(resolution, round(image.height * scale)))
    if size == image.size:
        return image
    # Lanczos when shrinking (no aliasing from large photos), bicubic when enlarging.
    resample = Image.Resampling.LANCZOS if scale < 1 else Image.Resampling.BICUBIC
    return image.resize(size, resample)


def crop_square(
    image: Image.Image, resolution: int, center: bool, rng: random.Random | None = None
) -> Image.Image:
    extra_x, extra_y = image.width - resolution, image.height - resolution
    if center or rng is None:
        left, top = extra_x // 2, extra_y // 2
    else:
        left, top = rng.randint(0, extra_x), rng.randint(0, extra_y)
    return image.crop((left, top, left + resolution, top + resolution))


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
    """Items ``{"pixel_values": [3, R, R] in [-1, 1], "caption": str, "index": int}``.

    Index with ``(index, draw)`` for augmented training draws; a plain index gives draw 0.
    """

    supports_draw_keys = True  # the training loader may pass (index, draw) keys

    def __init__(
        self,
        examples: list[Example],
        resolution: int,
        center_crop: bool = True,
        random_flip: bool = False,
        seed: int = 0,
        caption_transform: Callable[[str], str] | None = None,
    ):
        self.examples = list(examples)
        self.resolution = resolution
        self.center_crop = center_crop
        self.random_flip = random_flip
        self.seed = seed
        self.caption_transform = caption_transform
        # Decoded and resized once: fine-tuning sets are tens to hundreds of images, and decoding
        # per step would dominate a small model's step time.
        resized = [resize_shorter_side(image, resolution) for image in load_pil_images(self.examples)]
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
        if not self.center_crop:
            image = crop_square(image, self.resolution, center=False, rng=rng)
        pixels = to_tensor(image)
        if self.random_flip and rng is not None and rng.random() < 0.5:
            pixels = pixels.flip(-1)
        caption = self.examples[index].caption
        if self.caption_transform is not None:
            caption = self.caption_transform(caption)
        return {"pixel_values": pixels, "caption": caption, "index": index}


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
    cfg: Config, examples: list[Example], caption_transform: Callable[[str], str] | None = None
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
