"""Weights in the formats other tools load (``python -m sdsweep.export ... --format NAME``).

- ``diffusers`` (default): the trial's weights as the method saved them (a pipeline folder,
  ``pytorch_lora_weights.safetensors`` or ``learned_embeds.safetensors``).
- ``single_file``: full fine-tune / DreamBooth as one ``model.safetensors`` in the original Stable Diffusion
  key layout (AUTOMATIC1111, ComfyUI, diffusers ``from_single_file``); SD 1.x and SDXL.
- ``a1111``: what AUTOMATIC1111 loads for the method: the single-file checkpoint for a pipeline, a kohya-format
  LoRA (``lora_kohya.safetensors``, converted by diffusers' ``convert_state_dict_to_kohya``: ``lora_unet_*``,
  ``lora_te_*`` or SDXL's ``lora_te1_*``/``lora_te2_*``, each with its ``.alpha``), or an embedding
  (``embedding.safetensors``: ``emb_params``, or SDXL's ``clip_l``/``clip_g``) for textual inversion.
"""

from __future__ import annotations

import os
from pathlib import Path

from sdsweep.config.methods import EMBEDDINGS_FORMAT, LORA_FORMAT, PIPELINE_FORMAT, method_spec

FORMATS = ("diffusers", "single_file", "a1111")
SINGLE_FILE = "model.safetensors"
KOHYA_LORA_FILE = "lora_kohya.safetensors"
A1111_EMBEDDING_FILE = "embedding.safetensors"
EXPORT_CONFIG = "sdsweep_config.yaml"  # the trial's config, beside the weights: generate and the app read it


def load_exported_pipeline(folder: Path, cfg, device, scheduler: str):
    """A pipeline from what ``sdsweep.export`` wrote in any format (imports torch/diffusers)."""
    from sdsweep.models.loading import load_pipeline, make_inference_scheduler, resolve_model_source

    folder = Path(folder)
    if (folder / SINGLE_FILE).is_file():
        from sdsweep.results.single_file import load_single_file

        pipe = load_single_file(folder / SINGLE_FILE, resolve_model_source(cfg.model, cfg.paths.cache))
        pipe.scheduler = make_inference_scheduler(scheduler, pipe.scheduler.config)
        return pipe.to(device)
    if (folder / KOHYA_LORA_FILE).is_file() or (folder / A1111_EMBEDDING_FILE).is_file():
        pipe = load_pipeline(resolve_model_source(cfg.model, cfg.paths.cache), scheduler, device)
        if (folder / KOHYA_LORA_FILE).is_file():
            pipe.load_lora_weights(str(folder), weight_name=KOHYA_LORA_FILE)
        else:
            from sdsweep.training.methods.textual_inversion import load_embeddings

            spec = method_spec(cfg.method.name)
            load_embeddings(
                pipe, folder / A1111_EMBEDDING_FILE, spec.concept_token(cfg.method) if spec else None
            )
        return pipe
    from sdsweep.training.methods import load_trained_pipeline

    return load_trained_pipeline(cfg, folder, device, scheduler)


class FormatError(ValueError):
    """The requested format does not exist for the trial's weights; the message names the ones that do."""


def trained_version(weights: Path, weights_format: str, config: dict):
    """The Stable Diffusion version the trial's weights belong to (sdsweep.models.versions), without any
    download: a pipeline folder says it itself; an adapter's base model is read from its folder when it is
    local (model.path, a tiny or shapes build, a local pretrained folder), else from its hub id."""
    from sdsweep.models import versions

    if weights_format == PIPELINE_FORMAT:
        return versions.version_of_folder(weights)
    model = config.get("model") or {}
    for key in ("path", "pretrained"):
        local = Path(os.path.expanduser(str(model.get(key) or "")))
        if str(model.get(key) or "") and local.is_dir():
            return versions.version_of_folder(local)
    pretrained = str(model.get("pretrained") or "")
    if pretrained.startswith("tiny:"):
        return versions.SDXL if "xl" in pretrained else versions.SD
    names = f"{model.get('name') or ''} {pretrained}".lower()
    return versions.SDXL if "xl" in names else versions.SD


def output_file(fmt: str, weights_format: str) -> str | None:
    """The file ``fmt`` writes for ``weights_format`` (None: the diffusers weights are copied as they are)."""
    if fmt not in FORMATS:
        raise FormatError(f"Unknown --format {fmt}; choose one of {', '.join(FORMATS)}.")
    if fmt == "diffusers":
        return None
    if weights_format == PIPELINE_FORMAT:
        return SINGLE_FILE
    if fmt == "single_file":
        raise FormatError(
            f"--format single_file is a full Stable Diffusion checkpoint; this trial's weights are a {weights_format} "
            "adapter. Use --format a1111 (the file AUTOMATIC1111 and ComfyUI load) or --format diffusers."
        )
    return {LORA_FORMAT: KOHYA_LORA_FILE, EMBEDDINGS_FORMAT: A1111_EMBEDDING_FILE}[weights_format]


def lora_alphas(config: dict) -> dict[str, float]:
    """The trained lora_alpha per component (from the trial's config), for the kohya file's ``alpha``."""
    method = config.get("method") or {}
    spec = method_spec(str(method.get("name")))
    if spec is None or spec.weights_format != LORA_FORMAT:
        return {}
    rank = method.get("rank") or 4
    text = float(method.get("text_encoder_rank") or 4)  # alpha == rank on every text encoder
    return {"unet": float(method.get("alpha") or rank), "text_encoder": text, "text_encoder_2": text}


def _lora_alphas(path: Path) -> dict[str, float]:
    """lora_alpha per component ("unet", "text_encoder", "text_encoder_2") from the metadata diffusers writes
    with the weights."""
    import json

    from safetensors import safe_open

    with safe_open(str(path), "pt") as handle:
        metadata = handle.metadata() or {}
    raw = metadata.get("lora_adapter_metadata")
    alphas = {}
    # diffusers packs each part's LoraConfig flat: {"unet.lora_alpha": 8, "text_encoder_2.r": 4, ...}
    for key, value in (json.loads(raw) if raw else {}).items():
        component, _, option = key.rpartition(".")
        if option == "lora_alpha" and value is not None:
            alphas[component] = float(value)
    return alphas


# kohya's prefix (lora_te1, lora_te2: SDXL's encoders; lora_te: SD's one) -> the diffusers component
KOHYA_COMPONENTS = {"te": "text_encoder", "te1": "text_encoder", "te2": "text_encoder_2"}


def kohya_lora(path: Path, target: Path, alphas: dict[str, float] | None = None) -> Path:
    """A diffusers LoRA file as kohya's format; each module's ``alpha`` is the trained ``lora_alpha``
    (diffusers' converter writes alpha = rank, which changes the scale when alpha != rank)."""
    import torch
    from diffusers.utils import convert_state_dict_to_kohya
    from diffusers.utils.state_dict_utils import PEFT_TO_DIFFUSERS, convert_state_dict
    from safetensors.torch import load_file, save_file

    alphas = {**_lora_alphas(path), **(alphas or {})}
    # save_lora_weights wrote PEFT_TO_DIFFUSERS names (.lora.down/.lora.up); diffusers' own table, read back
    peft = convert_state_dict(load_file(str(path)), {new: old for old, new in PEFT_TO_DIFFUSERS.items()})
    state = convert_state_dict_to_kohya(peft)
    for key in [k for k in state if k.endswith(".alpha")]:
        component = KOHYA_COMPONENTS.get(
            key.split("_")[1], "unet"
        )  # lora_te1_..., lora_te2_..., lora_unet_...
        if component in alphas:
            state[key] = torch.tensor(alphas[component])
    partial = target.with_name(target.name + ".partial")
    save_file({k: v.contiguous() for k, v in state.items()}, str(partial))
    partial.replace(target)
    return target


def a1111_embedding(path: Path, target: Path) -> Path:
    """A textual-inversion file as an A1111 embedding: ``emb_params`` holding the vectors (the token is the
    file name in A1111; diffusers' ``load_textual_inversion`` reads it with ``token=``). An SDXL file
    (``clip_l`` and ``clip_g``, one tensor per encoder) is already A1111's SDXL embedding layout."""
    from safetensors.torch import load_file, save_file

    from sdsweep.training.methods.textual_inversion import ENCODER_KEYS

    learned = load_file(str(path))
    if set(learned) == set(ENCODER_KEYS):
        state, metadata = learned, {}
    elif len(learned) == 1:
        ((token, vectors),) = learned.items()
        state = {"emb_params": vectors if vectors.ndim == 2 else vectors.unsqueeze(0)}
        metadata = {"token": token}
    else:
        raise FormatError(f"{path} holds {len(learned)} tokens; an A1111 embedding holds one.")
    partial = target.with_name(target.name + ".partial")
    save_file({k: v.contiguous() for k, v in state.items()}, str(partial), metadata=metadata)
    partial.replace(target)
    return target


def convert(
    source: Path,
    weights_format: str,
    weights_file: str,
    fmt: str,
    target_dir: Path,
    lora_alphas: dict[str, float] | None = None,
) -> str | None:
    """Write the ``fmt`` file for the trial weights in ``source`` into ``target_dir``; returns its name."""
    name = output_file(fmt, weights_format)
    if name is None:
        return None
    target = Path(target_dir) / name
    if weights_format == PIPELINE_FORMAT:
        from sdsweep.results.single_file import write_single_file

        write_single_file(source, target)
    elif weights_format == LORA_FORMAT:
        kohya_lora(source / weights_file, target, lora_alphas)
    else:  # EMBEDDINGS_FORMAT (output_file refused any other)
        a1111_embedding(source / weights_file, target)
    return name
