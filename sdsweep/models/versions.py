"""What differs between Stable Diffusion versions, said in one place.

The training loop, the loss and the methods never ask "is this SDXL?": they ask the model's
``ModelVersion`` how prompts become UNet conditions and which diffusers pipeline holds the parts.

- SD 1.x / 2.x: one CLIP text encoder; its last hidden state is the cross-attention input.
- SDXL (Podell et al. 2023): two text encoders (CLIP ViT-L and OpenCLIP ViT-bigG, the second with a
  projection). Their penultimate hidden states, concatenated along the feature axis, are the
  cross-attention input; the second encoder's pooled, projected embedding and six "micro-conditioning"
  numbers per image, ``time_ids`` = (original height, width, crop top, crop left, target height, width),
  go in as added conditions. The crop coordinates tell the model where a training crop came from, so it
  learns not to draw cut-off subjects when asked for crop (0, 0).

A version is recognised from the saved pipeline (``model_index.json``'s class, or a ``text_encoder_2``
folder), so a local SDXL folder or hub ID needs no extra setting.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

# Per sample: (original height, original width, crop top, crop left), in pixels. Datasets record it for
# every image they resize and crop; the target size is the latents' own size.
SIZE_CONDITIONS = "size_conditions"
POOLED = "pooled_text_embeds"  # batch key of a cached pooled text embedding (SDXL)


@dataclass(frozen=True)
class PromptEmbeddings:
    """What the text encoders give for a batch of prompts: the cross-attention input and, for SDXL,
    the pooled embedding (None for SD 1.x/2.x)."""

    hidden_states: torch.Tensor  # [B, 77, D]
    pooled: torch.Tensor | None = None  # [B, P]

    @staticmethod
    def cat(parts: list[PromptEmbeddings]) -> PromptEmbeddings:
        pooled = [p.pooled for p in parts]
        return PromptEmbeddings(
            torch.cat([p.hidden_states for p in parts]),
            None if any(p is None for p in pooled) else torch.cat(pooled),
        )

    def expand(self, size: int) -> PromptEmbeddings:
        """One prompt's embeddings repeated ``size`` times (a view)."""
        pooled = None if self.pooled is None else self.pooled.expand(size, -1)
        return PromptEmbeddings(self.hidden_states.expand(size, -1, -1), pooled)

    def to(self, device: torch.device) -> PromptEmbeddings:
        pooled = None if self.pooled is None else self.pooled.to(device)
        return PromptEmbeddings(self.hidden_states.to(device), pooled)


@dataclass(frozen=True)
class ModelVersion:
    name: str
    pipeline_class: str  # the diffusers pipeline that holds (and loads, and samples) this version
    text_encoder_parts: tuple[str, ...]  # subfolders, in the pipeline's order
    tokenizer_parts: tuple[str, ...]
    saved_scheduler: str  # the sampler a saved pipeline folder carries (what the version ships with)
    # True: the UNet takes added conditions (pooled text + time_ids), and datasets record sizes and crops.
    size_conditioned: bool = False
    # The original (single-file) checkpoint's place for each text encoder, in ``text_encoder_parts`` order:
    # (key prefix, layout), the layout "clip" (transformers' CLIP keys) or "open_clip" (OpenCLIP's
    # resblocks with fused q/k/v and a transposed projection, as SDXL's second encoder is stored there).
    checkpoint_text_encoders: tuple[tuple[str, str], ...] = (("cond_stage_model.transformer.", "clip"),)
    # What a dropped caption (train.caption_dropout) conditions on: the branch classifier-free guidance
    # subtracts at sampling. SD 1.x/2.x encode the empty prompt; SDXL's pipeline uses zeros for it
    # (force_zeros_for_empty_prompt), as SDXL's own training zeroed a dropped condition.
    dropped_caption_is_zeros: bool = False

    @property
    def has_pooled_text(self) -> bool:
        return self.size_conditioned

    def pipeline_cls(self) -> Any:
        import diffusers

        return getattr(diffusers, self.pipeline_class)

    def encode(self, encoders: list[Any], ids: list[torch.Tensor]) -> PromptEmbeddings:
        """Token ids (one tensor per tokenizer) through their encoders, as the version's pipeline does."""
        if not self.size_conditioned:
            return PromptEmbeddings(encoders[0](ids[0], return_dict=False)[0])
        hidden, pooled = [], None
        for encoder, token_ids in zip(encoders, ids):
            output = encoder(token_ids, output_hidden_states=True)
            hidden.append(output.hidden_states[-2])  # SDXL conditions on the penultimate layer
            pooled = getattr(output, "text_embeds", None)  # the projected encoder's (the last one's)
        if pooled is None:
            raise ValueError(
                f"{self.name}: the last text encoder must have a projection (CLIPTextModelWithProjection)."
            )
        return PromptEmbeddings(torch.cat(hidden, dim=-1), pooled)

    def unread_text_modules(self, encoders: list[Any]) -> list[torch.nn.Module]:
        """Parts of the text encoders whose output the conditioning never reads, so that a method training
        the encoders leaves them frozen (on N data-parallel ranks, DDP refuses trained parameters that get
        no gradient). SDXL reads the penultimate hidden state of both encoders and the pooled output of
        the second: the first encoder's last layer and final norm are never read."""
        if not self.size_conditioned:
            return []
        text_model = getattr(encoders[0], "text_model", encoders[0])  # transformers 5 flattens it away
        return [text_model.encoder.layers[-1], text_model.final_layer_norm]

    def added_conditions(
        self,
        text: PromptEmbeddings,
        size_conditions: torch.Tensor | None,
        target_size: tuple[int, int],
    ) -> dict[str, torch.Tensor] | None:
        """The UNet's ``added_cond_kwargs`` for a batch; None for versions without added conditions.

        ``size_conditions`` [B, 4]: each sample's original (height, width) and crop (top, left), as the
        dataset recorded them; ``target_size``: the (height, width) in pixels the latents decode to.
        """
        if not self.size_conditioned:
            return None
        if text.pooled is None:
            raise ValueError(f"{self.name} needs the pooled text embedding; the batch has none.")
        batch = text.hidden_states.shape[0]
        if size_conditions is None:
            raise KeyError(
                f"{self.name} conditions on each image's original size and crop, but the batch has no "
                f"'{SIZE_CONDITIONS}' (a dataset that does not record them)."
            )
        if size_conditions.shape[0] != batch:
            raise ValueError(f"{size_conditions.shape[0]} size conditions for a batch of {batch}.")
        device = text.hidden_states.device
        target = torch.tensor(target_size, dtype=torch.float32).expand(batch, 2)
        time_ids = torch.cat([size_conditions.float().cpu(), target], dim=1).to(device)
        return {"text_embeds": text.pooled, "time_ids": time_ids.to(text.pooled.dtype)}

    def pipeline_parts(self, components: Any) -> dict[str, Any]:
        """Constructor arguments of ``pipeline_cls()`` from loaded components (no scheduler)."""
        parts = {
            "unet": components.unet,
            "vae": components.vae,
            "text_encoder": components.text_encoder,
            "tokenizer": components.tokenizer,
        }
        if self.size_conditioned:
            parts.update(text_encoder_2=components.text_encoder_2, tokenizer_2=components.tokenizer_2)
        else:
            parts.update(safety_checker=None, feature_extractor=None, requires_safety_checker=False)
        return parts

    def load_kwargs(self) -> dict[str, Any]:
        """Extra ``from_pretrained`` arguments of the version's pipeline."""
        if self.size_conditioned:
            return {}
        return {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}


SD = ModelVersion(
    name="sd",
    pipeline_class="StableDiffusionPipeline",
    text_encoder_parts=("text_encoder",),
    tokenizer_parts=("tokenizer",),
    saved_scheduler="pndm",
)
SDXL = ModelVersion(
    name="sdxl",
    pipeline_class="StableDiffusionXLPipeline",
    text_encoder_parts=("text_encoder", "text_encoder_2"),
    tokenizer_parts=("tokenizer", "tokenizer_2"),
    saved_scheduler="euler",
    size_conditioned=True,
    dropped_caption_is_zeros=True,
    checkpoint_text_encoders=(
        ("conditioner.embedders.0.transformer.", "clip"),
        ("conditioner.embedders.1.model.", "open_clip"),
    ),
)
VERSIONS = {version.name: version for version in (SD, SDXL)}


def version_of_folder(folder: str | Path) -> ModelVersion:
    """The version of a saved diffusers folder: its pipeline class, else whether it has a second encoder."""
    folder = Path(folder)
    index = folder / "model_index.json"
    if index.exists():
        try:
            class_name = json.loads(index.read_text()).get("_class_name", "")
        except (OSError, ValueError):
            class_name = ""
        if "XL" in class_name:
            return SDXL
        if class_name:
            return SD
    return SDXL if (folder / "text_encoder_2").is_dir() else SD


def version_of_components(components: Any) -> ModelVersion:
    return SDXL if getattr(components, "text_encoder_2", None) is not None else SD
