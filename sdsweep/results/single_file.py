"""A diffusers Stable Diffusion folder as one ``.safetensors`` checkpoint in the original (LDM/SGM) key layout,
which AUTOMATIC1111, ComfyUI and diffusers' ``from_single_file`` load.

The key mapping is the inverse of the one diffusers applies when it reads such a file
(``diffusers.loaders.single_file_utils``: ``DIFFUSERS_TO_LDM_MAPPING``, ``convert_ldm_unet_checkpoint``,
``convert_ldm_vae_checkpoint``, ``convert_ldm_clip_checkpoint``, ``convert_open_clip_checkpoint``), so the
round trip is exact; the export tests load the file back with ``from_single_file`` and compare images.
UNet and VAE keys are the same for every version (SDXL's added conditions are ``label_emb``); where each
text encoder goes, and in which layout, is the model version's ``checkpoint_text_encoders``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

UNET_PREFIX = "model.diffusion_model."  # single_file_utils.LDM_UNET_KEY
VAE_PREFIX = "first_stage_model."  # single_file_utils.LDM_VAE_KEYS[0]
# update_unet_resnet_ldm_to_diffusers, read right to left
UNET_RESNET = [
    ("norm1", "in_layers.0"),
    ("conv1", "in_layers.2"),
    ("norm2", "out_layers.0"),
    ("conv2", "out_layers.3"),
    ("time_emb_proj", "emb_layers.1"),
    ("conv_shortcut", "skip_connection"),
]
# update_vae_attentions_ldm_to_diffusers, read right to left
VAE_ATTENTION = [
    ("group_norm.", "norm."),
    ("to_q.", "q."),
    ("to_k.", "k."),
    ("to_v.", "v."),
    ("to_out.0.", "proj_out."),
]


class SingleFileError(ValueError):
    """The pipeline cannot be written as an original-layout checkpoint; the message says why."""


def _rename(rest: str, pairs: list[tuple[str, str]]) -> str:
    for new, old in pairs:
        rest = rest.replace(new, old)
    return rest


def _unet_key(key: str, layers_per_block: int, has_up_attention: dict[int, bool]) -> str:
    from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING

    tables = DIFFUSERS_TO_LDM_MAPPING["unet"]
    for table in ("layers", "addition_embed_type", "class_embed_type"):  # SDXL's add_embedding: label_emb
        if key in tables[table]:
            return tables[table][key]
    parts = key.split(".")
    step = layers_per_block + 1
    if parts[0] == "down_blocks":
        block, kind = int(parts[1]), parts[2]
        if kind == "downsamplers":  # down_blocks.b.downsamplers.0.conv.X -> input_blocks.i.0.op.X
            return f"input_blocks.{1 + block * step + layers_per_block}.0.op." + ".".join(parts[5:])
        index = 1 + block * step + int(parts[3])
        rest = ".".join(parts[4:])
        if kind == "resnets":
            return f"input_blocks.{index}.0.{_rename(rest, UNET_RESNET)}"
        return f"input_blocks.{index}.1.{rest}"
    if parts[0] == "mid_block":
        rest = ".".join(parts[3:])
        if parts[1] == "resnets":
            return f"middle_block.{2 * int(parts[2])}.{_rename(rest, UNET_RESNET)}"
        return f"middle_block.1.{rest}"
    if parts[0] == "up_blocks":
        block, kind = int(parts[1]), parts[2]
        if kind == "upsamplers":  # .1.conv after a resnet alone, .2.conv after resnet + attention
            slot = 2 if has_up_attention.get(block) else 1
            return f"output_blocks.{block * step + layers_per_block}.{slot}." + ".".join(parts[4:])
        index = block * step + int(parts[3])
        rest = ".".join(parts[4:])
        if kind == "resnets":
            return f"output_blocks.{index}.0.{_rename(rest, UNET_RESNET)}"
        return f"output_blocks.{index}.1.{rest}"
    raise SingleFileError(f"UNet weight {key} has no place in the original Stable Diffusion layout.")


def _vae_key(key: str, num_up_blocks: int) -> str:
    from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING

    table = DIFFUSERS_TO_LDM_MAPPING["vae"]
    if key in table:
        return table[key]
    side, *parts = key.split(".")
    if parts[0] == "mid_block":
        if parts[1] == "resnets":
            rest = ".".join(parts[3:]).replace("conv_shortcut", "nin_shortcut")
            return f"{side}.mid.block_{int(parts[2]) + 1}.{rest}"
        return f"{side}.mid.attn_1.{_rename('.'.join(parts[3:]), VAE_ATTENTION)}"
    block = int(parts[1])
    if parts[0] == "down_blocks":
        if parts[2] == "downsamplers":
            return f"{side}.down.{block}.downsample." + ".".join(parts[4:])
        return f"{side}.down.{block}.block.{parts[3]}." + ".".join(parts[4:]).replace(
            "conv_shortcut", "nin_shortcut"
        )
    if parts[0] == "up_blocks":
        original = num_up_blocks - 1 - block  # diffusers numbers the decoder's up blocks in reverse
        if parts[2] == "upsamplers":
            return f"{side}.up.{original}.upsample." + ".".join(parts[4:])
        return f"{side}.up.{original}.block.{parts[3]}." + ".".join(parts[4:]).replace(
            "conv_shortcut", "nin_shortcut"
        )
    raise SingleFileError(f"VAE weight {key} has no place in the original Stable Diffusion layout.")


def _load(folder: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise SingleFileError(f"{folder} holds no .safetensors weights to convert.")
    state: dict[str, Any] = {}
    for file in files:
        state.update(load_file(str(file)))
    return state


def _clip_state(state: dict[str, Any]) -> dict[str, Any]:
    # The original layout nests CLIP under text_model. (transformers >= 5.6 saves CLIPTextModel flat)
    return {
        (key if key.startswith("text_model.") else "text_model." + key): value for key, value in state.items()
    }


def _open_clip_state(state: dict[str, Any]) -> dict[str, Any]:
    """A transformers CLIP text encoder with projection in OpenCLIP's layout: the inverse of diffusers'
    ``convert_open_clip_checkpoint`` (q/k/v fused into ``in_proj``, the projection stored transposed)."""
    import torch
    from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING

    layers = DIFFUSERS_TO_LDM_MAPPING["openclip"]["layers"]
    renames = DIFFUSERS_TO_LDM_MAPPING["openclip"]["transformer"]
    out: dict[str, Any] = {}
    fused: dict[str, dict[str, Any]] = {}
    for key, value in state.items():
        if not key.startswith(("text_model.", "text_projection.")):
            key = "text_model." + key
        if key in layers:
            out[layers[key]] = value.T if key == "text_projection.weight" else value
            continue
        if not key.startswith("text_model.encoder.layers."):
            raise SingleFileError(f"Text encoder weight {key} has no place in OpenCLIP's layout.")
        for new, old in renames.items():
            key = key.replace(new, old)
        head, _, kind = key.rpartition(".")  # resblocks.N.attn.q_proj, weight
        if head.endswith((".q_proj", ".k_proj", ".v_proj")):
            fused.setdefault(f"{head[:-7]}.in_proj_{kind}", {})[head[-6]] = value
        else:
            out["transformer." + key] = value
    for key, qkv in fused.items():
        out["transformer." + key] = torch.cat([qkv["q"], qkv["k"], qkv["v"]])
    return out


TEXT_LAYOUTS = {"clip": _clip_state, "open_clip": _open_clip_state}


def original_state_dict(pipeline_dir: Path) -> dict[str, Any]:
    """The UNet, VAE and text encoders of a diffusers SD 1.x or SDXL folder, keyed as the original checkpoints."""
    from sdsweep.models.versions import version_of_folder

    pipeline_dir = Path(pipeline_dir)
    version = version_of_folder(pipeline_dir)
    text_config = json.loads((pipeline_dir / "text_encoder" / "config.json").read_text())
    if (
        not version.size_conditioned
        and text_config.get("hidden_act") == "gelu"
        and text_config.get("num_hidden_layers", 0) >= 23
    ):
        raise SingleFileError(
            f"{pipeline_dir} has an OpenCLIP text encoder (SD 2.x); only CLIP (SD 1.x-style) text encoders "
            "are written as single files. Export with --format diffusers."
        )
    unet_config = json.loads((pipeline_dir / "unet" / "config.json").read_text())
    vae_config = json.loads((pipeline_dir / "vae" / "config.json").read_text())
    layers = unet_config["layers_per_block"]
    if not isinstance(layers, int):
        raise SingleFileError(
            f"{pipeline_dir}/unet has per-block layer counts {layers}; not an SD 1.x/2.x or SDXL UNet."
        )
    up_attention = {i: "CrossAttn" in name for i, name in enumerate(unet_config["up_block_types"])}
    state: dict[str, Any] = {}
    for key, value in _load(pipeline_dir / "unet").items():
        state[UNET_PREFIX + _unet_key(key, layers, up_attention)] = value
    num_up = len(vae_config["up_block_types"])
    for key, value in _load(pipeline_dir / "vae").items():
        original = _vae_key(key, num_up)
        if ".mid.attn_1." in original and original.endswith(".weight") and value.ndim == 2:
            value = value[:, :, None, None]  # linear -> 1x1 conv, undone by conv_attn_to_linear on load
        state[VAE_PREFIX + original] = value
    for part, (prefix, layout) in zip(version.text_encoder_parts, version.checkpoint_text_encoders):
        for key, value in TEXT_LAYOUTS[layout](_load(pipeline_dir / part)).items():
            state[prefix + key] = value
    return state


def write_single_file(pipeline_dir: Path, target: Path) -> Path:
    """Write ``target`` (.safetensors, original SD layout) from a diffusers pipeline folder, atomically."""
    from safetensors.torch import save_file

    state = {k: v.contiguous() for k, v in original_state_dict(pipeline_dir).items()}
    partial = target.with_name(target.name + ".partial")
    save_file(state, str(partial), metadata={"format": "pt", "written_by": "sdsweep"})
    partial.replace(target)
    return target


def load_single_file(path: Path, config_dir: str | Path, **kwargs: Any):
    """The version's pipeline from a single-file checkpoint, with the configs of ``config_dir`` (offline).

    diffusers' ``from_single_file`` picks each text encoder's keys by the width of its position embedding,
    so two encoders of equal width (the tiny SDXL) would both read the CLIP one: an OpenCLIP-layout encoder
    is converted by diffusers' own ``convert_open_clip_checkpoint`` and handed in instead."""
    from safetensors import safe_open

    from sdsweep.models.versions import version_of_folder

    version = version_of_folder(config_dir)
    for part, (prefix, layout) in zip(version.text_encoder_parts, version.checkpoint_text_encoders):
        if layout != "open_clip" or part in kwargs:
            continue
        from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint
        from transformers import CLIPTextConfig, CLIPTextModelWithProjection

        encoder = CLIPTextModelWithProjection(CLIPTextConfig.from_pretrained(str(config_dir), subfolder=part))
        with safe_open(str(path), "pt") as handle:
            state = {key: handle.get_tensor(key) for key in handle.keys() if key.startswith(prefix)}
        encoder.load_state_dict(convert_open_clip_checkpoint(encoder, state, prefix=prefix), strict=True)
        kwargs[part] = encoder.eval()
    options = {**version.load_kwargs(), **kwargs}
    return version.pipeline_cls().from_single_file(
        str(path), config=str(config_dir), local_files_only=True, **options
    )
