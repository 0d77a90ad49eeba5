"""Aspect-ratio bucketing: train portrait and landscape images without cropping away their edges.

A bucket is a training size (width, height) with about the area of the square training resolution.
Each image goes to the bucket nearest its aspect ratio, is resized to cover it and centre-cropped (so
at most a sliver is lost), and batches are drawn from one bucket at a time, so every batch has one
shape. This follows kohya's scheme: for each width on a ``step`` grid between the min and max side,
the tallest height on the grid that keeps ``w x h <= resolution^2``.

The grid step must keep the UNet's latent sides divisible by its downsampling: 64 px for Stable
Diffusion (VAE /8, three UNet downsamples), 4 px for the tiny test models (VAE /2, one downsample).
``train.bucket_step=null`` takes exactly that multiple from the loaded model, so a tiny 32 px model
gets buckets such as 24x40, 28x36, 32x32, 36x28, 40x24.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image

from sdsweep.config.resolve import resolved_resolution
from sdsweep.config.schema import Config
from sdsweep.data.examples import Example
from sdsweep.data.images import (
    CaptionTransform,
    ItemKey,
    draw_seed,
    load_pil_images,
    size_conditions,
    split_key,
    to_tensor,
    transformed_caption,
)
from sdsweep.errors import ConfigError

Bucket = tuple[int, int]  # (width, height) in pixels


def size_multiple(components: Any) -> int:
    """The pixel multiple a training side must be: VAE downsampling x the UNet's downsampling."""
    unet_downsamples = len(components.unet.config.block_out_channels) - 1
    return components.vae_scale_factor * 2**unet_downsamples


@dataclass(frozen=True)
class BucketGrid:
    resolution: int
    step: int
    min_side: int
    max_side: int
    max_ratio: float

    def buckets(self) -> list[Bucket]:
        """Every (w, h) of the grid, sorted by aspect ratio; the square one is always included."""
        max_area = self.resolution * self.resolution
        found = {(self.resolution, self.resolution)}
        for width in range(self.min_side, self.max_side + 1, self.step):
            height = min(self.max_side, (max_area // width) // self.step * self.step)
            if height >= self.min_side and max(width, height) / min(width, height) <= self.max_ratio:
                found.add((width, height))
        return sorted(found, key=lambda b: b[0] / b[1])


def grid_for(cfg: Config, components: Any) -> BucketGrid:
    """The configured grid with its automatic defaults; a step the model cannot take is a ConfigError."""
    resolution = resolved_resolution(cfg)
    multiple = size_multiple(components)
    step = cfg.train.bucket_step or multiple
    if step % multiple:
        raise ConfigError(
            f"Invalid config value train.bucket_step={step}: this model needs sides that are multiples of "
            f"{multiple} px; use a multiple of {multiple} or null (automatic)."
        )
    if resolution % step:
        raise ConfigError(
            f"Invalid config value train.bucket_step={step}: the training resolution {resolution} must be a "
            "multiple of the bucket step, so that the square bucket is on the grid."
        )
    min_side = cfg.train.bucket_min_side or max(step, resolution // 2 // step * step)
    max_side = cfg.train.bucket_max_side or resolution * 2
    if not min_side <= resolution <= max_side:
        raise ConfigError(
            f"Invalid config value train.bucket_min_side/bucket_max_side={min_side}/{max_side}: the range "
            f"must include the training resolution {resolution}."
        )
    return BucketGrid(resolution, step, min_side, max_side, cfg.train.bucket_max_ratio)


def nearest_bucket(width: int, height: int, buckets: list[Bucket]) -> Bucket:
    """The bucket whose aspect ratio is nearest (in log ratio) the image's; ties go to the larger."""
    ratio = math.log(width / height)
    return min(buckets, key=lambda b: (abs(math.log(b[0] / b[1]) - ratio), -b[0] * b[1]))


def bucket_crop(
    size: tuple[int, int], bucket: Bucket, rng: random.Random | None = None
) -> tuple[tuple[int, int], tuple[int, int]]:
    """Where an image of ``size`` (width, height) goes in ``bucket``: its resized size, covering the
    bucket, and the crop's (left, top) in it (centred, or from ``rng``)."""
    width, height = bucket
    scale = max(width / size[0], height / size[1])
    resized = (max(width, round(size[0] * scale)), max(height, round(size[1] * scale)))
    extra_x, extra_y = resized[0] - width, resized[1] - height
    if rng is None:
        return resized, (extra_x // 2, extra_y // 2)
    return resized, (rng.randint(0, extra_x), rng.randint(0, extra_y))


def fit_to_bucket(image: Image.Image, bucket: Bucket, rng: random.Random | None = None) -> Image.Image:
    """Resize so the image covers the bucket, then crop it to the bucket (centred, or from ``rng``)."""
    return crop_to_bucket(image, bucket, *bucket_crop(image.size, bucket, rng))


def crop_to_bucket(
    image: Image.Image, bucket: Bucket, size: tuple[int, int], origin: tuple[int, int]
) -> Image.Image:
    """``image`` resized to ``size`` and cropped to ``bucket`` at ``origin`` (from ``bucket_crop``)."""
    width, height = bucket
    if size != image.size:
        scale = max(width / image.width, height / image.height)
        resample = Image.Resampling.LANCZOS if scale < 1 else Image.Resampling.BICUBIC
        image = image.convert("RGB").resize(size, resample)
    left, top = origin
    return image.crop((left, top, left + width, top + height))


def assign_buckets(images: list[Image.Image], buckets: list[Bucket]) -> list[Bucket]:
    return [nearest_bucket(image.width, image.height, buckets) for image in images]


class BucketBatchSampler(torch.utils.data.Sampler):
    """Endless batches of ``(index, draw)`` keys, every batch from one bucket.

    Epoch e shuffles the images with a generator seeded by ``(seed, e)``, cuts each bucket's images
    into batches (a bucket's last, short batch is filled by cycling through that bucket, so every batch
    has ``batch_size`` items, as kohya does), and shuffles the batches. The batches of an epoch depend
    only on ``(seed, e)``, so a resumed run starts exactly at batch ``start``.
    """

    def __init__(self, bucket_ids: list[int], batch_size: int, seed: int, start: int = 0):
        if not bucket_ids:
            raise ValueError("The training dataset is empty; there is nothing to train on.")
        self.bucket_ids, self.batch_size, self.seed, self.start = list(bucket_ids), batch_size, seed, start
        counts: dict[int, int] = {}
        for bucket in self.bucket_ids:
            counts[bucket] = counts.get(bucket, 0) + 1
        self.batches_per_epoch = sum(math.ceil(n / batch_size) for n in counts.values())

    def epoch_batches(self, epoch: int) -> list[list[ItemKey]]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        order = torch.randperm(len(self.bucket_ids), generator=generator).tolist()
        by_bucket: dict[int, list[int]] = {}
        for index in order:
            by_bucket.setdefault(self.bucket_ids[index], []).append(index)
        batches: list[list[int]] = []
        for bucket in sorted(by_bucket):
            members = by_bucket[bucket]
            slots = math.ceil(len(members) / self.batch_size) * self.batch_size
            filled = [members[i % len(members)] for i in range(slots)]
            batches += [filled[i : i + self.batch_size] for i in range(0, slots, self.batch_size)]
        shuffled = [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]
        first_draw = epoch * self.batches_per_epoch * self.batch_size
        return [
            [(index, first_draw + b * self.batch_size + k) for k, index in enumerate(batch)]
            for b, batch in enumerate(shuffled)
        ]

    def __iter__(self) -> Iterator[list[ItemKey]]:
        epoch, offset = divmod(self.start, self.batches_per_epoch)
        while True:
            yield from self.epoch_batches(epoch)[offset:]
            epoch, offset = epoch + 1, 0


class BucketedImageDataset(torch.utils.data.Dataset):
    """The pixel dataset with buckets: items ``{"pixel_values": [3, h, w], "caption", "index"}``.

    Used when the latent cache is off (or the crop is random). ``bucket_ids[i]`` is image i's bucket.
    """

    supports_draw_keys = True

    def __init__(
        self,
        examples: list[Example],
        grid: BucketGrid,
        center_crop: bool = True,
        random_flip: bool = False,
        seed: int = 0,
        caption_transform: CaptionTransform | None = None,
    ):
        self.examples = list(examples)
        self.center_crop, self.random_flip, self.seed = center_crop, random_flip, seed
        self.caption_transform = caption_transform
        self.buckets = grid.buckets()
        images = load_pil_images(self.examples)
        self.original_sizes = [image.size for image in images]
        self.image_buckets = assign_buckets(images, self.buckets)
        self.bucket_ids = [self.buckets.index(b) for b in self.image_buckets]
        if center_crop:  # the crop never changes, so keep only the crop
            self._images = [fit_to_bucket(im, b) for im, b in zip(images, self.image_buckets, strict=True)]
        else:
            self._images = images

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, key: ItemKey) -> dict[str, Any]:
        index, draw = split_key(key)
        rng = random.Random(draw_seed(self.seed, index, draw))
        image, bucket, original = self._images[index], self.image_buckets[index], self.original_sizes[index]
        resized, origin = bucket_crop(original, bucket, None if self.center_crop else rng)
        if not self.center_crop:
            image = crop_to_bucket(image, bucket, resized, origin)
        pixels = to_tensor(image)
        flipped = self.random_flip and rng.random() < 0.5
        if flipped:
            pixels = pixels.flip(-1)
        caption = transformed_caption(
            self.caption_transform, self.examples[index].caption, self.seed, index, draw
        )
        sizes = size_conditions(original, resized, bucket, origin, flipped)
        return {"pixel_values": pixels, "caption": caption, "index": index, "size_conditions": sizes}
