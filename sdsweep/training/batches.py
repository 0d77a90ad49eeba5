"""The stream of batches a training run draws: which samples, in which order, and their noise seeds.

Every draw depends only on ``(seed, draw number)``, so a resumed run starts at draw k and sees exactly
what an uninterrupted one would, and N data-parallel ranks together see exactly the draws of a single
process with an N times larger batch.
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
    per-draw augmentation (flip, crop, VAE sample); others get plain indices.

    With ``world_size`` > 1 the stream is cut into chunks of ``chunk`` draws (one rank's batch) and
    rank r keeps chunks r, r + world_size, ...: the ranks' batches of one step together are exactly the
    draws a single process takes with a world_size times larger batch.
    """

    def __init__(
        self,
        size: int,
        seed: int,
        start: int = 0,
        draw_keys: bool = True,
        rank: int = 0,
        world_size: int = 1,
        chunk: int = 1,
    ):
        if size < 1:
            raise ValueError("The training dataset is empty; there is nothing to train on.")
        self.size, self.seed, self.start, self.draw_keys = size, seed, start, draw_keys
        self.rank, self.world_size, self.chunk = rank, world_size, chunk

    def epoch_order(self, epoch: int) -> list[int]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.size, generator=generator).tolist()

    def __iter__(self) -> Iterator[Any]:
        draw = self.start
        while True:
            epoch, offset = divmod(draw, self.size)
            for index in self.epoch_order(epoch)[offset:]:
                if (draw // self.chunk) % self.world_size == self.rank:
                    yield (index, draw) if self.draw_keys else index
                draw += 1


class RankBatches(torch.utils.data.Sampler):
    """Every ``world_size``-th batch of a batch sampler, from batch ``rank`` on (bucketed data)."""

    def __init__(self, batches: torch.utils.data.Sampler, rank: int, world_size: int):
        self.batches, self.rank, self.world_size = batches, rank, world_size

    def __iter__(self) -> Iterator[Any]:
        for number, batch in enumerate(self.batches):
            if number % self.world_size == self.rank:
                yield batch


def infinite_batches(
    dataset: torch.utils.data.Dataset,
    batch_size: int,
    seed: int,
    skip: int = 0,
    rank: int = 0,
    world_size: int = 1,
) -> Iterator[dict[str, Any]]:
    """Collated batches forever, starting after ``skip`` draws (of all ranks together); with
    ``world_size`` > 1 only this rank's share (deterministic: see ``SeededInfiniteSampler``).

    No worker processes: items are cached latents or pre-decoded, pre-resized images (a crop and a
    tensor conversion), cheaper than a worker's IPC; on CPU workers would also take the model's cores.
    """
    bucket_ids = getattr(dataset, "bucket_ids", None)
    if bucket_ids is not None:  # aspect-ratio buckets: every batch comes from one bucket (one shape)
        batch_sampler = BucketBatchSampler(bucket_ids, batch_size, seed, start=skip // batch_size)
        loader = torch.utils.data.DataLoader(
            dataset,
            batch_sampler=RankBatches(batch_sampler, rank, world_size) if world_size > 1 else batch_sampler,
            collate_fn=collate,
            num_workers=0,
            generator=torch.Generator().manual_seed(seed),  # as below: keep the global RNG untouched
        )
        return iter(loader)
    sampler = SeededInfiniteSampler(
        len(dataset),
        seed,
        skip,
        getattr(dataset, "supports_draw_keys", False),
        rank=rank,
        world_size=world_size,
        chunk=batch_size,
    )
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        collate_fn=collate,
        num_workers=0,
        # Its own generator: otherwise creating the iterator draws a seed from the global torch RNG,
        # which shifts the noise of every later step and breaks resume equality.
        generator=torch.Generator().manual_seed(seed),
    )
    return iter(loader)


def noise_seeds(seed: int, step: int, first: int, count: int) -> list[int]:
    """Seeds of samples ``first .. first+count-1`` of the global batch of optimizer step ``step``
    (global index: micro-step, then rank, then position), the same for 1 or N ranks."""
    return [draw_seed(seed + NOISE_SALT, first + i, step) for i in range(count)]
