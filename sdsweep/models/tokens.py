"""Prompts to token ids, padded the way Stable Diffusion's text encoder was trained (77 tokens)."""

from __future__ import annotations

import torch


def tokenize_prompts(tokenizer, prompts: list[str]) -> torch.Tensor:
    """Input ids padded to the tokenizer's 77 tokens, the length SD's text encoder was trained on."""
    return tokenizer(
        prompts,
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids
