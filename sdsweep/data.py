"""Image-caption datasets and transforms (PIL + torch; no torchvision).

Every image is opened and verified when the dataset is listed, so a missing or corrupt file is
reported by name before any model is loaded.
"""

from __future__ import annotations

import csv
import json
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from sdsweep.config import Config, resolved_resolution

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}
IMAGE_COLUMNS = ("file_name", "image", "image_file", "path", "filename")
CAPTION_COLUMNS = ("text", "caption", "prompt", "captions")


class DataError(ValueError):
    """The training data cannot be used; the message names the file or column and the fix."""


@dataclass(frozen=True)
class Example:
    image_path: Path
    caption: str


def _read_rows(folder: Path) -> tuple[list[dict[str, Any]], Path]:
    jsonl = folder / "metadata.jsonl"
    if jsonl.exists():
        rows = []
        for number, line in enumerate(jsonl.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as error:
                raise DataError(f"{jsonl} line {number} is not valid JSON ({error.msg}); fix or remove that line.") from None
        return rows, jsonl
    table = folder / "metadata.csv"
    if table.exists():
        with open(table, newline="") as f:
            return list(csv.DictReader(f)), table
    raise DataError(
        f"No metadata.jsonl or metadata.csv in {folder}. Add one with a line per image, e.g. "
        '{"file_name": "001.png", "text": "a photo of sks dog"}, or use data=instances with data.instance_prompt=... .'
    )


def _pick_column(rows: list[dict[str, Any]], wanted: str | None, candidates: tuple[str, ...], what: str, source: Path) -> str:
    columns = list(rows[0].keys()) if rows else []
    if wanted:
        if wanted not in columns:
            raise DataError(
                f"The {what} column '{wanted}' is not in {source}; its columns are {columns}. "
                f"Set data.{what}_column to one of them."
            )
        return wanted
    for name in candidates:
        if name in columns:
            return name
    raise DataError(
        f"Could not find the {what} column in {source}: looked for {list(candidates)}, found {columns}. "
        f"Set data.{what}_column=<name>."
    )


def verify_image(path: Path) -> None:
    if not path.exists():
        raise DataError(f"Image not found: {path}. Fix the path in the metadata or add the file.")
    try:
        with Image.open(path) as image:
            image.verify()
        with Image.open(path) as image:
            image.load()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        raise DataError(f"Image {path} is corrupt or not an image ({error}). Replace or remove it.") from None


def _imagefolder_examples(folder: Path, cfg: Config) -> list[Example]:
    rows, source = _read_rows(folder)
    if not rows:
        raise DataError(f"{source} lists no images; add at least one line.")
    image_column = _pick_column(rows, cfg.data.image_column, IMAGE_COLUMNS, "image", source)
    caption_column = _pick_column(rows, cfg.data.caption_column, CAPTION_COLUMNS, "caption", source)
    examples = []
    for row in rows:
        path = Path(str(row[image_column])).expanduser()
        path = path if path.is_absolute() else folder / path
        caption = row.get(caption_column)
        if isinstance(caption, list):  # several captions per image: the first is the canonical one
            caption = caption[0] if caption else ""
        examples.append(Example(path, str(caption or cfg.data.instance_prompt or "")))
    return examples


def _instance_examples(folder: Path, cfg: Config) -> list[Example]:
    if not cfg.data.instance_prompt:
        raise DataError("data=instances needs data.instance_prompt, e.g. data.instance_prompt='a photo of sks dog'.")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    return [Example(p, cfg.data.instance_prompt) for p in files]


def load_examples(cfg: Config) -> list[Example]:
    """The configured dataset as (image, caption) pairs, every image verified."""
    if cfg.data.kind == "demo":
        from sdsweep import tiny

        folder = tiny.ensure_demo_dataset(cfg.data.demo_num_images, cfg.paths.cache)
    else:
        folder = Path(str(cfg.data.path)).expanduser()
        if not folder.is_dir():
            raise DataError(f"data.path={cfg.data.path} is not a folder. Point data.path at the folder holding your images.")
    examples = _instance_examples(folder, cfg) if cfg.data.kind == "instances" else _imagefolder_examples(folder, cfg)
    if not examples:
        raise DataError(f"The dataset in {folder} is empty: no images found ({sorted(IMAGE_SUFFIXES)}).")
    for example in examples:
        verify_image(example.image_path)
    return examples


def split_examples(examples: list[Example], num_heldout: int) -> tuple[list[Example], list[Example]]:
    """The last ``num_heldout`` images (in a fixed shuffled order) are held out for validation."""
    if num_heldout and len(examples) - num_heldout < 1:
        raise DataError(
            f"data.num_heldout={num_heldout} leaves no training images out of {len(examples)}; "
            "lower data.num_heldout or add images."
        )
    order = list(range(len(examples)))
    random.Random(0).shuffle(order)
    heldout_ids = set(order[len(order) - num_heldout :]) if num_heldout else set()
    train = [e for i, e in enumerate(examples) if i not in heldout_ids]
    heldout = [e for i, e in enumerate(examples) if i in heldout_ids]
    return train, heldout


def load_pil_images(examples: list[Example]) -> list[Image.Image]:
    images = []
    for example in examples:
        with Image.open(example.image_path) as image:
            images.append(image.convert("RGB"))
    return images


def resize_and_crop(image: Image.Image, resolution: int, center_crop: bool, rng: random.Random | None = None) -> Image.Image:
    """Shorter side to ``resolution``, then a square crop (centred, or seeded-random)."""
    image = image.convert("RGB")
    scale = resolution / min(image.size)
    size = (max(resolution, round(image.width * scale)), max(resolution, round(image.height * scale)))
    image = image.resize(size, Image.Resampling.BICUBIC)
    extra_x, extra_y = image.width - resolution, image.height - resolution
    if center_crop or rng is None:
        left, top = extra_x // 2, extra_y // 2
    else:
        left, top = rng.randint(0, extra_x), rng.randint(0, extra_y)
    return image.crop((left, top, left + resolution, top + resolution))


def to_tensor(image: Image.Image) -> torch.Tensor:
    """PIL RGB -> float tensor [3, H, W] in [-1, 1], the range the VAE expects."""
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


class ImageCaptionDataset(torch.utils.data.Dataset):
    def __init__(
        self,
        examples: list[Example],
        resolution: int,
        center_crop: bool = True,
        random_flip: bool = False,
        seed: int = 0,
        caption_transform: Callable[[str], str] | None = None,
    ):
        self.examples = examples
        self.resolution = resolution
        self.center_crop = center_crop
        self.random_flip = random_flip
        self.rng = random.Random(seed)
        self.caption_transform = caption_transform or (lambda caption: caption)
        # Decoded once: datasets here are tens of images, and re-decoding dominates tiny-model steps.
        self._images = load_pil_images(examples)

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> dict[str, Any]:
        image = resize_and_crop(self._images[index], self.resolution, self.center_crop, self.rng)
        if self.random_flip and self.rng.random() < 0.5:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        caption = self.caption_transform(self.examples[index].caption)
        return {"pixel_values": to_tensor(image), "caption": caption, "index": index}


def collate(items: list[dict[str, Any]]) -> dict[str, Any]:
    batch: dict[str, Any] = {"captions": [item["caption"] for item in items]}
    for key in ("pixel_values", "latents", "encoder_hidden_states"):
        if key in items[0]:
            batch[key] = torch.stack([item[key] for item in items])
    batch["index"] = torch.tensor([item["index"] for item in items])
    return batch


def dataset_for(cfg: Config, examples: list[Example], caption_transform=None) -> ImageCaptionDataset:
    return ImageCaptionDataset(
        examples,
        resolved_resolution(cfg),
        center_crop=cfg.data.center_crop,
        random_flip=cfg.data.random_flip,
        seed=cfg.train.seed,
        caption_transform=caption_transform,
    )
