"""Caption dropout and tag shuffling: per-draw caption changes, reproducible per draw."""

from __future__ import annotations

import random
from typing import Any

import torch

from sdsweep.config.schema import Config
from sdsweep.data.images import draw_seed, split_key
from sdsweep.models.versions import PromptEmbeddings


class DroppedCaption(str):
    """The empty caption of a dropped draw: equal to "" (and tokenized as "") but recognisable, so that the
    text encoding can give a version whose unconditional branch is zeros (SDXL) zeros for exactly these rows,
    and not for an image whose own caption is empty."""

    def __new__(cls, _unpickled: str = "") -> DroppedCaption:  # pickle passes the text back: always ""
        return super().__new__(cls, "")


def zero_dropped(captions: list[str], text: PromptEmbeddings) -> PromptEmbeddings:
    """``text`` with the rows of dropped captions set to zero (a mask product: the graph stays whole)."""
    keep = torch.tensor([not isinstance(c, DroppedCaption) for c in captions], dtype=text.hidden_states.dtype)
    if bool(keep.all()):
        return text
    keep = keep.to(text.hidden_states.device)
    pooled = None if text.pooled is None else text.pooled * keep[:, None]
    return PromptEmbeddings(text.hidden_states * keep[:, None, None], pooled)


class CaptionDropout(torch.utils.data.Dataset):
    """Replaces a draw's caption by the empty one with probability ``probability``.

    Training some samples unconditionally keeps the empty-prompt branch that classifier-free guidance
    subtracts in tune with the fine-tuned model (kohya, SimpleTuner and OneTrainer all offer it). The
    choice for draw ``(index, draw)`` comes from its own seeded stream, so it is reproducible and a
    resumed run drops exactly the captions an uninterrupted one would. Cached text embeddings of a
    dropped sample become ``empty_embedding`` (zeros on SDXL: ``ModelVersion.dropped_caption_is_zeros``).
    """

    SALT = 0x5EED_CA9  # keeps the dropout stream apart from the flip/crop stream of the same draw

    def __init__(
        self,
        dataset: torch.utils.data.Dataset,
        probability: float,
        seed: int,
        empty_embedding: torch.Tensor | None = None,
        empty_pooled: torch.Tensor | None = None,
    ):
        self.dataset, self.probability, self.seed = dataset, probability, seed
        self.empty_embedding = empty_embedding
        self.empty_pooled = empty_pooled  # SDXL's pooled embedding of the empty caption
        self.supports_draw_keys = getattr(dataset, "supports_draw_keys", False)
        self.bucket_ids = getattr(dataset, "bucket_ids", None)

    def __len__(self) -> int:
        return len(self.dataset)

    def dropped(self, key: Any) -> bool:
        index, draw = split_key(key)
        return random.Random(draw_seed(self.seed + self.SALT, index, draw)).random() < self.probability

    def __getitem__(self, key: Any) -> dict[str, Any]:
        item = self.dataset[key]
        if not self.dropped(key):
            return item
        item = {**item, "caption": DroppedCaption()}
        if "encoder_hidden_states" in item:
            item["encoder_hidden_states"] = self.empty_embedding
        if "pooled_text_embeds" in item:
            item["pooled_text_embeds"] = self.empty_pooled
        return item


def with_caption_dropout(cfg: Config, method: Any, dataset: torch.utils.data.Dataset):
    """The dataset wrapped in ``CaptionDropout`` when ``train.caption_dropout`` > 0."""
    if not cfg.train.caption_dropout:
        return dataset
    empty = empty_pooled = None
    if getattr(dataset, "text_rows", None) is not None:  # cached text embeddings: encode the dropped one once
        with torch.no_grad():
            text = method.encode_prompts([DroppedCaption()])
        empty = text.hidden_states[0].detach().float().cpu()
        if text.pooled is not None:
            empty_pooled = text.pooled[0].detach().float().cpu()
    return CaptionDropout(dataset, cfg.train.caption_dropout, cfg.train.seed, empty, empty_pooled)


def shuffle_tags(caption: str, keep_tokens: int, rng: random.Random) -> str:
    """kohya's shuffle_caption: the comma-separated tags after the first ``keep_tokens`` in a random order."""
    tags = [tag.strip() for tag in caption.split(",")]
    kept, rest = tags[:keep_tokens], tags[keep_tokens:]
    rng.shuffle(rest)
    return ", ".join(tag for tag in kept + rest if tag)


class TagShuffle(torch.utils.data.Dataset):
    """Shuffles each draw's comma-separated tags (``data.shuffle_tags``), keeping the first
    ``data.keep_tokens`` in place. The order of draw ``(index, draw)`` comes from its own seeded stream:
    the same on every data-parallel rank and after a resume. A shuffled caption is encoded per step, so
    cached text embeddings of the unshuffled caption are dropped from the item."""

    SALT = 0x7A65_5F  # keeps the shuffle stream apart from the flip/crop and dropout streams

    def __init__(self, dataset: torch.utils.data.Dataset, keep_tokens: int, seed: int):
        self.dataset, self.keep_tokens, self.seed = dataset, keep_tokens, seed
        self.supports_draw_keys = getattr(dataset, "supports_draw_keys", False)
        self.bucket_ids = getattr(dataset, "bucket_ids", None)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: Any) -> dict[str, Any]:
        item = dict(self.dataset[key])
        index, draw = split_key(key)
        rng = random.Random(draw_seed(self.seed + self.SALT, index, draw))
        item["caption"] = shuffle_tags(item["caption"], self.keep_tokens, rng)
        item.pop("encoder_hidden_states", None)
        item.pop("pooled_text_embeds", None)
        return item


def with_tag_shuffle(cfg: Config, dataset: torch.utils.data.Dataset):
    """The dataset wrapped in ``TagShuffle`` when ``data.shuffle_tags``."""
    if not cfg.data.shuffle_tags:
        return dataset
    return TagShuffle(dataset, cfg.data.keep_tokens, cfg.train.seed)
