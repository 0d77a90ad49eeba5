"""Textual inversion: learn the embedding of a new token; every other embedding row stays bit-identical."""

from __future__ import annotations

import random
from pathlib import Path

import torch

from sdsweep.config import ConfigError
from sdsweep.methods.base import FineTuneMethod

OBJECT_TEMPLATES = [
    "a photo of a {}",
    "a rendering of a {}",
    "a close-up photo of the {}",
    "a bright photo of the {}",
    "a photo of a small {}",
    "a dark photo of the {}",
    "a photo of the large {}",
]
STYLE_TEMPLATES = [
    "a painting in the style of {}",
    "a rendering in the style of {}",
    "a picture in the style of {}",
    "a close-up painting in the style of {}",
    "a bright painting in the style of {}",
]


class TextualInversion(FineTuneMethod):
    name = "textual_inversion"

    def placeholder_tokens(self) -> list[str]:
        base = self.cfg.method.placeholder_token
        return [base] + [f"{base}_{i}" for i in range(1, self.cfg.method.num_vectors)]

    def prepare(self) -> None:
        tokenizer, encoder = self.components.tokenizer, self.components.text_encoder
        method = self.cfg.method
        tokens = self.placeholder_tokens()
        existing = [t for t in tokens if t in tokenizer.get_vocab()]
        if existing:
            raise ConfigError(
                f"The placeholder token {existing[0]!r} already exists in the tokenizer's vocabulary; "
                "choose a new one, e.g. method.placeholder_token='<my-concept>'."
            )
        init_ids = tokenizer.encode(method.initializer_token, add_special_tokens=False)
        if len(init_ids) != 1:
            raise ConfigError(
                f"The initializer token {method.initializer_token!r} is {len(init_ids)} tokens for this tokenizer; "
                "method.initializer_token must be a single token (a common word such as 'dog', 'person' or 'painting')."
            )
        tokenizer.add_tokens(tokens)
        self.token_ids = tokenizer.convert_tokens_to_ids(tokens)
        encoder.resize_token_embeddings(len(tokenizer))
        embeddings = encoder.get_input_embeddings().weight
        with torch.no_grad():
            for token_id in self.token_ids:
                embeddings[token_id] = embeddings[init_ids[0]].clone()
        # Only the embedding matrix gets gradients; rows other than ours are restored after every step.
        encoder.requires_grad_(False)
        encoder.get_input_embeddings().requires_grad_(True)
        encoder.train()
        self.components.unet.requires_grad_(False)
        self.original_embeddings = embeddings.detach().clone()
        self.frozen_rows = torch.ones(len(tokenizer), dtype=torch.bool)
        self.frozen_rows[self.token_ids] = False
        self._rng = random.Random(self.cfg.train.seed)

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [self.components.text_encoder.get_input_embeddings().weight]

    def uses_frozen_text_encoder(self) -> bool:
        return False

    def placeholder_string(self) -> str:
        return " ".join(self.placeholder_tokens())

    def transform_caption(self, caption: str) -> str:
        template = self.cfg.method.template
        if template in ("object", "style"):
            templates = OBJECT_TEMPLATES if template == "object" else STYLE_TEMPLATES
            return self._rng.choice(templates).format(self.placeholder_string())
        trigger = self.cfg.data.trigger_word
        if trigger and trigger in caption.split():
            return " ".join(self.placeholder_string() if w == trigger else w for w in caption.split())
        return f"{self.placeholder_string()} {caption}"

    def after_optimizer_step(self) -> None:
        embeddings = self.components.text_encoder.get_input_embeddings().weight
        with torch.no_grad():
            embeddings[self.frozen_rows] = self.original_embeddings[self.frozen_rows].to(embeddings.dtype)

    def learned_embeddings(self) -> dict[str, torch.Tensor]:
        weight = self.components.text_encoder.get_input_embeddings().weight.detach().cpu()
        return {token: weight[token_id].clone() for token, token_id in zip(self.placeholder_tokens(), self.token_ids)}

    def save(self, out_dir: Path) -> Path:
        from safetensors.torch import save_file

        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / "learned_embeds.safetensors"
        save_file({k: v.contiguous() for k, v in self.learned_embeddings().items()}, str(path))
        return path

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {f"row{i}": v for i, v in enumerate(self.learned_embeddings().values())}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        weight = self.components.text_encoder.get_input_embeddings().weight
        with torch.no_grad():
            for i, token_id in enumerate(self.token_ids):
                weight[token_id] = state[f"row{i}"].to(weight.device, weight.dtype)

    def set_train_mode(self, training: bool) -> None:
        self.components.text_encoder.train(training)
