"""Textual inversion: learn the embedding of a new token; every other embedding row stays bit-identical.

The optimizer sees the whole input-embedding matrix (that is the parameter), so after every step all
rows except the new tokens' are copied back from a snapshot. ``num_vectors > 1`` learns ``<tok>``,
``<tok>_1``, ...; the file is saved in the diffusers layout ``{"<tok>": [num_vectors, dim]}``, which
``pipe.load_textual_inversion`` expands back into those tokens and into prompts that say ``<tok>``.
"""

from __future__ import annotations

import random
import re
from pathlib import Path

import torch

from sdsweep.config.methods import EMBEDS_FILE
from sdsweep.errors import ConfigError
from sdsweep.training.methods.base import FineTuneMethod

WEIGHTS_NAME = EMBEDS_FILE  # one name, in the method spec (export finds it there without torch)
# A two-encoder model (SDXL) saves one tensor per encoder under these keys, the layout diffusers' SDXL
# textual-inversion example writes and ``load_textual_inversion`` is called with, encoder by encoder.
ENCODER_KEYS = ("clip_l", "clip_g")

# Prompt templates of the original paper: the placeholder in varied contexts, so the embedding learns
# the subject (object) or the look (style) rather than one caption.
OBJECT_TEMPLATES = (
    "a photo of a {}",
    "a rendering of a {}",
    "a cropped photo of the {}",
    "a close-up photo of a {}",
    "a bright photo of the {}",
    "a dark photo of the {}",
    "a photo of the small {}",
    "a photo of the large {}",
    "a good photo of a {}",
)
STYLE_TEMPLATES = (
    "a painting in the style of {}",
    "a rendering in the style of {}",
    "a cropped painting in the style of {}",
    "a picture in the style of {}",
    "a close-up painting in the style of {}",
    "a bright painting in the style of {}",
    "a good painting in the style of {}",
)
TEMPLATES = {"object": OBJECT_TEMPLATES, "style": STYLE_TEMPLATES}


def load_embeddings(pipe, path: Path, token: str | None) -> None:
    """A saved embedding file into ``pipe`` through diffusers' ``load_textual_inversion``: SD's
    ``{token: vectors}`` (or A1111's ``emb_params`` with ``token``), SDXL's ``clip_l`` / ``clip_g`` encoder by
    encoder."""
    if getattr(pipe, "text_encoder_2", None) is None:
        pipe.load_textual_inversion(str(path), **({"token": token} if token else {}))
        return
    from safetensors.torch import load_file

    state = load_file(str(path))
    for key, encoder, tokenizer in zip(
        ENCODER_KEYS, (pipe.text_encoder, pipe.text_encoder_2), (pipe.tokenizer, pipe.tokenizer_2)
    ):
        pipe.load_textual_inversion(state[key], token=token, text_encoder=encoder, tokenizer=tokenizer)


class TextualInversion(FineTuneMethod):
    name = "textual_inversion"

    @classmethod
    def load_trained(cls, cfg, weights_dir: Path, device, scheduler: str):
        from sdsweep.models.loading import load_pipeline, resolve_model_source

        pipe = load_pipeline(resolve_model_source(cfg.model, cfg.paths.cache), scheduler, device)
        load_embeddings(pipe, weights_dir / WEIGHTS_NAME, cfg.method.placeholder_token)
        return pipe

    @classmethod
    def mark_trainable(cls, unet, text_encoder, footprint) -> None:
        cls.mark_text_encoder(text_encoder, footprint)

    @classmethod
    def mark_text_encoder(cls, text_encoder, footprint) -> None:
        # The whole embedding table gets gradients; the method restores the old rows after each step.
        text_encoder.get_input_embeddings().weight.requires_grad_(True)

    def placeholder_tokens(self) -> list[str]:
        base = self.cfg.method.placeholder_token
        return [base] + [f"{base}_{i}" for i in range(1, self.cfg.method.num_vectors)]

    def placeholder_text(self) -> str:
        """What stands for the concept in a training caption: every vector's token, in order."""
        return " ".join(self.placeholder_tokens())

    def prepare(self) -> None:
        """One new token (per vector) in every tokenizer, its row trained in every text encoder (SDXL: both,
        together, from the same initializer word)."""
        initializer_ids = [self._validate_tokens(tokenizer) for tokenizer in self.components.tokenizers]
        tokens = self.placeholder_tokens()
        self.encoder_token_ids, self.original_embeddings, self.frozen_rows = [], [], []
        self.components.unet.requires_grad_(False)
        for tokenizer, text_encoder, initializer_id in zip(
            self.components.tokenizers, self.components.text_encoders, initializer_ids
        ):
            tokenizer.add_tokens(tokens)
            token_ids = tokenizer.convert_tokens_to_ids(tokens)
            text_encoder.resize_token_embeddings(len(tokenizer))
            embeddings = text_encoder.get_input_embeddings().weight
            with torch.no_grad():
                embeddings[token_ids] = embeddings[initializer_id].clone()
            text_encoder.requires_grad_(False)
            text_encoder.get_input_embeddings().requires_grad_(True)
            text_encoder.train()
            frozen = torch.ones(len(tokenizer), dtype=torch.bool, device=embeddings.device)
            frozen[token_ids] = False
            self.encoder_token_ids.append(token_ids)
            self.original_embeddings.append(embeddings.detach().clone())
            self.frozen_rows.append(frozen)
        self.token_ids = self.encoder_token_ids[0]  # the first (SD's only) encoder's rows
        self.template_rng = random.Random(self.cfg.train.seed)

    def _validate_tokens(self, tokenizer) -> int:
        """The initializer's token id; ConfigError for a taken placeholder or a multi-token initializer."""
        method = self.cfg.method
        placeholder = method.placeholder_token
        if not placeholder or any(c.isspace() for c in placeholder):
            raise ConfigError(
                f"method.placeholder_token={placeholder!r} must be one word without spaces, e.g. '<my-concept>'."
            )
        taken = [token for token in self.placeholder_tokens() if _is_known_word(tokenizer, token)]
        if taken:
            raise ConfigError(
                f"The placeholder token {taken[0]!r} already exists in the tokenizer's vocabulary, so "
                "textual inversion would overwrite a word the model already knows. Choose a new token, "
                "e.g. method.placeholder_token='<my-concept>'."
            )
        initializer_ids = tokenizer.encode(method.initializer_token, add_special_tokens=False)
        if len(initializer_ids) != 1:
            pieces = tokenizer.convert_ids_to_tokens(initializer_ids)
            raise ConfigError(
                f"method.initializer_token={method.initializer_token!r} is {len(initializer_ids)} tokens "
                f"{pieces} for this tokenizer, but the new embedding starts as a copy of exactly one token. "
                "Use a single common word close to the concept, e.g. 'dog', 'person' or 'painting'."
            )
        return initializer_ids[0]

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [encoder.get_input_embeddings().weight for encoder in self.components.text_encoders]

    def uses_frozen_text_encoder(self) -> bool:
        return False  # the learned rows change every step, so caption embeddings cannot be cached

    def set_train_mode(self, training: bool) -> None:
        for encoder in self.components.text_encoders:
            encoder.train(training)

    def transform_caption(self, caption: str, rng: random.Random | None = None) -> str:
        template = self.cfg.method.template
        if template in TEMPLATES:
            # The datasets pass a generator seeded by the draw: the template of a draw is then the same
            # whichever data-parallel rank loads it, and after a resume.
            chooser = rng if rng is not None else self.template_rng
            return chooser.choice(TEMPLATES[template]).format(self.placeholder_text())
        # template "none": keep the dataset caption and put the placeholder where the trigger word is.
        trigger = self.cfg.data.trigger_word
        if trigger:
            pattern = re.compile(rf"(?<!\S){re.escape(trigger)}(?=[\s.,;:!?]|$)")
            if pattern.search(caption):
                return pattern.sub(lambda _: self.placeholder_text(), caption)
        return f"{self.placeholder_text()} {caption}"

    def after_optimizer_step(self) -> None:
        for encoder, frozen, original in zip(
            self.components.text_encoders, self.frozen_rows, self.original_embeddings
        ):
            embeddings = encoder.get_input_embeddings().weight
            with torch.no_grad():
                embeddings[frozen] = original[frozen]

    def learned_embeddings(self, encoder: int = 0) -> torch.Tensor:
        """[num_vectors, dim]: the placeholder tokens' rows in text encoder ``encoder`` (0: the first)."""
        weight = self.components.text_encoders[encoder].get_input_embeddings().weight
        return weight[self.encoder_token_ids[encoder]].detach().cpu().clone()

    def save(self, out_dir: Path) -> Path:
        """SD: ``{token: [num_vectors, dim]}``; SDXL: ``{"clip_l": ..., "clip_g": ...}``, one per encoder."""
        from safetensors.torch import save_file

        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / WEIGHTS_NAME
        count = len(self.components.text_encoders)
        if count == 1:
            tensors = {self.cfg.method.placeholder_token: self.learned_embeddings()}
        else:
            tensors = {key: self.learned_embeddings(i) for i, key in enumerate(ENCODER_KEYS[:count])}
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
        return path

    def state_dict(self) -> dict[str, torch.Tensor]:
        # Only the learned rows: the rest of the matrix is the base model's and is restored anyway.
        return {_state_key(i): self.learned_embeddings(i) for i in range(len(self.components.text_encoders))}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for i, encoder in enumerate(self.components.text_encoders):
            weight = encoder.get_input_embeddings().weight
            with torch.no_grad():
                weight[self.encoder_token_ids[i]] = state[_state_key(i)].to(weight.device, weight.dtype)


def _state_key(encoder: int) -> str:
    """``textual_inversion.embeddings`` (the first encoder, as before SDXL), ``..._2`` for the second."""
    return "textual_inversion.embeddings" + (f"_{encoder + 1}" if encoder else "")


def _is_known_word(tokenizer, token: str) -> bool:
    """True when the tokenizer already has ``token``: as an entry, or as one whole-word BPE piece.

    CLIP stores words as ``photo</w>``, so a placeholder ``photo`` is not a vocabulary key, yet adding
    it would hijack every prompt that says "photo".
    """
    if token in tokenizer.get_vocab():
        return True
    pieces = tokenizer.tokenize(token)
    return len(pieces) == 1 and pieces[0] != tokenizer.unk_token
