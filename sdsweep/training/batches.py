"""The stream of batches a training run draws: which samples, in which order, and their noise seeds.

Every draw depends only on ``(seed, draw number)``, so a resumed run starts at draw k and sees exactly
what an uninterrupted one would. ``training_loader`` is the stream of one process at the *global*
batch size; with N data-parallel ranks the training loop prepares it with accelerate
(``split_batches=True``): every rank walks the same stream of index batches and loads only its slice,
positions ``r*b .. (r+1)*b - 1`` of each global batch, so N ranks with batch b together see exactly
the draws of a single process with batch N*b, and each sample's noise seeds (``noise_seeds``, by
global index) follow it. With aspect-ratio buckets a global batch comes from one bucket and is split
the same way, so every rank of a step trains the same shape.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

from sdsweep.data.buckets import BucketBatchSampler
from sdsweep.data.images import collate, draw_seed

NOISE_SALT = 0x401_5E  # keeps the noise stream apart from the flip/crop and caption-dropout streams


class SeededInfiniteSampler(torch.utils.data.Sampler):
    """An endless stream of dataset keys: epoch e is a permutation drawn from a torch Generator seeded by
    ``(seed, e)``, so the k-th draw depends only on ``(seed, k)`` and a resumed run can start at draw k.

    Datasets that declare ``supports_draw_keys`` get ``(index, draw)`` keys, which seed their
    per-draw augmentation (flip, crop, VAE sample, caption template); others get plain indices.
    """

    def __init__(self, size: int, seed: int, start: int = 0, draw_keys: bool = True):
        if size < 1:
            raise ValueError("The training dataset is empty; there is nothing to train on.")
        self.size, self.seed, self.start, self.draw_keys = size, seed, start, draw_keys

    def epoch_order(self, epoch: int) -> list[int]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.size, generator=generator).tolist()

    def __iter__(self) -> Iterator[Any]:
        draw = self.start
        while True:
            epoch, offset = divmod(draw, self.size)
            for index in self.epoch_order(epoch)[offset:]:
                yield (index, draw) if self.draw_keys else index
                draw += 1


def training_loader(
    dataset: torch.utils.data.Dataset, batch_size: int, seed: int, skip: int = 0
) -> torch.utils.data.DataLoader:
    """The endless loader of collated batches of ``batch_size`` (the global batch), starting after
    ``skip`` draws.

    No worker processes: items are cached latents or pre-decoded, pre-resized images (a crop and a
    tensor conversion), cheaper than a worker's IPC; on CPU workers would also take the model's cores.
    Its own generator: otherwise creating the iterator draws a seed from the global torch RNG, which
    shifts the noise of every later step and breaks resume equality.
    """
    generator = torch.Generator().manual_seed(seed)
    bucket_ids = getattr(dataset, "bucket_ids", None)
    if bucket_ids is not None:  # aspect-ratio buckets: every batch comes from one bucket (one shape)
        batch_sampler = BucketBatchSampler(bucket_ids, batch_size, seed, start=skip // batch_size)
        return torch.utils.data.DataLoader(
            dataset, batch_sampler=batch_sampler, collate_fn=collate, num_workers=0, generator=generator
        )
    draw_keys = getattr(dataset, "supports_draw_keys", False)
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=SeededInfiniteSampler(len(dataset), seed, skip, draw_keys),
        collate_fn=collate,
        num_workers=0,
        generator=generator,
    )


def infinite_batches(
    dataset: torch.utils.data.Dataset, batch_size: int, seed: int, skip: int = 0
) -> Iterator[dict[str, Any]]:
    """One process's batches of ``training_loader`` (benchmarks, tests, inspection)."""
    return iter(training_loader(dataset, batch_size, seed, skip))


def noise_seeds(seed: int, step: int, first: int, count: int) -> list[int]:
    """Seeds of samples ``first .. first+count-1`` of the global batch of optimizer step ``step``
    (global index: micro-step, then rank, then position), the same for 1 or N ranks."""
    return [draw_seed(seed + NOISE_SALT, first + i, step) for i in range(count)]
