"""DINO subject fidelity (DreamBooth, Ruiz et al. 2023): cosine similarity of self-supervised ViT embeddings.

CLIP-I compares CLIP image embeddings, which were trained to match captions: two different dogs that a
caption would call the same ("a corgi on grass") score high. DINO was trained without text to tell
individual images apart, so its CLS embedding is more sensitive to the subject's own appearance; DreamBooth
reports both. ``eval/dino`` is, per generated image, the mean cosine similarity of its DINO CLS embedding
with the instance images' (``dino`` in the unit table), and the metric is their mean.

The model comes from ``eval.dino_model``: a Hugging Face id (``facebook/dino-vits16``), a local folder, or
``tiny`` (a small random ViT built offline, for tests). Loaded through transformers' ``AutoModel`` and
``AutoImageProcessor``: no torchvision, no timm.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
from PIL import Image


class DINOUnavailableError(RuntimeError):
    """The configured DINO model cannot be loaded (offline, typo). Raised before any generation."""


def load_dino(name: str, cache: str | None = None, device: torch.device | str = "cpu"):
    """(model, image processor) for ``tiny``, a local folder or a hub id; the fix in the error otherwise."""
    from transformers import AutoImageProcessor, AutoModel

    if name == "tiny":
        from sdsweep.models import tiny

        source = str(tiny.ensure_tiny_dino(cache))
    else:
        source = os.path.expanduser(name)
    try:
        try:  # ViT (DINO v1) has an unused pooler; other backbones (DINOv2) take no such argument
            model = AutoModel.from_pretrained(source, add_pooling_layer=False)
        except TypeError:
            model = AutoModel.from_pretrained(source)
        processor = AutoImageProcessor.from_pretrained(source)
    except Exception as error:  # offline, missing, gated or misspelt: the fix is the same
        raise DINOUnavailableError(
            f"DINO model {name!r} could not be loaded offline ({type(error).__name__}: {str(error)[:200]}); "
            "download it once (e.g. facebook/dino-vits16) or set eval.dino_model to a local folder / 'tiny'."
        ) from None
    model.requires_grad_(False)
    return model.eval().to(device), processor


@torch.no_grad()
def dino_embeddings(model, processor, images: Sequence[Image.Image], batch_size: int = 16) -> torch.Tensor:
    """Unit-length CLS embeddings [N, D] on the CPU."""
    device = next(model.parameters()).device
    chunks = []
    for start in range(0, len(images), batch_size):
        batch = [image.convert("RGB") for image in images[start : start + batch_size]]
        pixels = processor(images=batch, return_tensors="pt")["pixel_values"].to(device)
        cls = model(pixel_values=pixels).last_hidden_state[:, 0]
        chunks.append(torch.nn.functional.normalize(cls.float(), dim=-1).cpu())
    return torch.cat(chunks)


def dino_per_image(
    model, processor, generated: Sequence[Image.Image], instances: Sequence[Image.Image]
) -> list[float]:
    """Each generated image's mean cosine similarity to the instance images (their mean is ``eval/dino``)."""
    if not generated or not instances:
        from sdsweep.evaluation.metrics import MetricUnavailable

        raise MetricUnavailable("DINO needs generated images and at least one instance image.")
    similarity = dino_embeddings(model, processor, generated) @ dino_embeddings(model, processor, instances).T
    return [float(v) for v in similarity.mean(dim=1)]
