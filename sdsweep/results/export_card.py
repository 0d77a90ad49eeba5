"""Pieces of an exported model: the inference scheduler the trials were judged with (written as plain
JSON, no torch import) and the model-card sections that say how the numbers were measured.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from sdsweep import io
from sdsweep.config.methods import EMBEDDINGS_FORMAT, EMBEDS_FILE, LORA_FORMAT, PIPELINE_FORMAT
from sdsweep.metric_names import direction_arrow, direction_words, fmt_number, warnings_for
from sdsweep.study.record import TrialRecord

# eval.scheduler name -> (diffusers class, extra config), the same choices as
# sdsweep.models.loading.make_inference_scheduler (kept in step by tests/test_export.py).
SCHEDULERS: dict[str, tuple[str, dict[str, Any]]] = {
    "dpmsolver++": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++"}),
    "ddim": ("DDIMScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "pndm": ("PNDMScheduler", {"skip_prk_steps": True}),
}
# PNDM/DDIM-only keys that other schedulers would log as "not expected and will be ignored".
_PNDM_ONLY = ("skip_prk_steps", "set_alpha_to_one")


def scheduler_class(name: str | None) -> tuple[str, dict[str, Any]]:
    return SCHEDULERS.get(str(name or "pndm"), SCHEDULERS["pndm"])


def set_pipeline_scheduler(folder: Path, name: str | None) -> str:
    """Make a saved pipeline folder load with the evaluation scheduler instead of the training one;
    returns the class name. The noise schedule (betas, timesteps, prediction type) is kept as trained."""
    cls, extra = scheduler_class(name)
    config_path = folder / "scheduler" / "scheduler_config.json"
    config = io.read_json(config_path) or {}
    if cls not in ("PNDMScheduler", "DDIMScheduler"):
        config = {k: v for k, v in config.items() if k not in _PNDM_ONLY}
    config.update(extra)
    config["_class_name"] = cls
    io.atomic_write_json(config_path, config)
    index_path = folder / "model_index.json"
    index = io.read_json(index_path)
    if index is not None:
        index["scheduler"] = ["diffusers", cls]
        io.atomic_write_json(index_path, index)
    return cls


def scheduler_lines(name: str | None, fmt_name: str) -> str:
    """Python that puts the judged scheduler on a pipeline (LoRA / embeddings load onto the base model)."""
    cls, extra = scheduler_class(name)
    if fmt_name == PIPELINE_FORMAT:
        return ""  # already in the exported folder's scheduler/
    args = "".join(f", {k}={json.dumps(v) if isinstance(v, str) else v!r}" for k, v in extra.items())
    return f"from diffusers import {cls}\npipe.scheduler = {cls}.from_config(pipe.scheduler.config{args})\n"


def is_tiny(base_model: str, model: str | None) -> bool:
    return str(base_model).startswith("tiny") or model == "tiny"


def is_shapes(base_model: str, model: str | None) -> bool:
    return str(base_model).startswith("shapes:") or model == "shapes"


def data_lines(info: dict[str, Any], config: dict[str, Any]) -> list[str]:
    """The training data as recorded: study.json ``data`` (when the sweep writes one), else the trial's
    config ``data`` section; empty settings are left out."""
    data = info.get("data") if isinstance(info.get("data"), dict) else (config.get("data") or {})
    lines = [
        f"- `{key}`: {fmt_number(value) if isinstance(value, (int, float)) else value}"
        for key, value in data.items()
        if value not in (None, "", [], {}) and not isinstance(value, (dict, list))
    ]
    return lines or ["- not recorded"]


def eval_lines(info: dict[str, Any], config: dict[str, Any]) -> list[str]:
    """Prompts, seeds, sampler, steps and guidance scale the metrics were measured with."""
    recorded = info.get("eval") or {}
    configured = config.get("eval") or {}
    scheduler = recorded.get("scheduler", configured.get("scheduler"))
    steps = recorded.get("num_inference_steps", configured.get("num_inference_steps"))
    guidance = recorded.get("guidance_scale", configured.get("guidance_scale"))
    seeds = recorded.get("seeds") or []
    lines = [
        f"- Sampler: `{scheduler}` ({scheduler_class(scheduler)[0]}), {fmt_number(steps)} steps, "
        f"guidance scale {fmt_number(guidance)}",
        f"- Seeds: {', '.join(str(s) for s in seeds) or 'not recorded'}",
        "- Prompts:",
    ]
    lines += [f"  - `{p}`" for p in recorded.get("prompts") or configured.get("prompts") or []]
    prior = recorded.get("prior_prompts") or configured.get("prior_prompts") or []
    if prior:  # what the fine-tune had to keep (eval/prior_clip_score)
        lines += ["- Prior prompts (language drift, `eval/prior_clip_score`):"]
        lines += [f"  - `{p}`" for p in prior]
    return lines


def metric_rows(record: TrialRecord, baseline: dict[str, float]) -> list[str]:
    """``| metric ↑ | this model | baseline | delta | better |``, internal flags left out."""
    from sdsweep.metric_names import is_internal

    rows = []
    for key, value in sorted(record.metrics.items()):
        if key.count("/") != 1 or is_internal(key):
            continue  # per-prompt breakdowns stay in sdsweep_trial.json; flags are not metrics
        delta = value - baseline[key] if isinstance(value, (int, float)) and key in baseline else None
        warned = " ⚠" if warnings_for(key, record.warnings) else ""
        rows.append(
            f"| `{key}`{' ' + direction_arrow(key) if direction_arrow(key) else ''} | {fmt_number(value)}{warned} | {fmt_number(baseline.get(key))} | "
            f"{'–' if delta is None else f'{delta:+.4g}'} | {direction_words(key) or '–'} |"
        )
    return rows


def warning_lines(record: TrialRecord) -> list[str]:
    return [f"- ⚠ {w}" for w in record.warnings]


def base_model_note(base_model: str, model: str | None) -> list[str]:
    """A note when the base is not a hub checkpoint: the tiny test model or the offline shapes model."""
    if is_tiny(base_model, model):
        return [
            "",
            f"> **Test model.** `{base_model}` is a tiny, randomly initialised model built by `sdsweep.models.tiny` "
            "for tests and demos, not a real Stable Diffusion checkpoint. Its images are noise and its "
            "metrics say nothing about image quality.",
        ]
    if is_shapes(base_model, model):
        return [
            "",
            f"> **Offline demo model.** `{base_model}` is the small shapes model sdsweep builds locally "
            "(`python -m sdsweep.models.shapes_build`, cached under `$SDSWEEP_CACHE/shapes`), not a hub "
            "checkpoint: load the base from that folder instead of the ID.",
        ]
    return []


def summary_lines(base_model: str, method: str, fmt_name: str, trigger: str | None) -> list[str]:
    """Base model, method with its weights format, and the trigger word (or that there is none)."""
    return [
        "",
        f"- Base model: `{base_model}`",
        f"- Method: `{method}` (weights format: {fmt_name})",
        f"- Trigger word / placeholder token: `{trigger}`"
        if trigger
        else "- Trigger word: none (style or general fine-tune)",
    ]


def metrics_section(
    record: TrialRecord, baseline: dict[str, float], constraints: list[str], feasible: bool
) -> list[str]:
    """The "Metrics" table against the untuned base model, then the study's constraints if it has any."""
    lines = [
        "",
        "## Metrics",
        "",
        "Deltas against the untuned base model; ↑ higher is better, ↓ lower is better; ⚠ see Warnings.",
        "",
    ]
    lines += ["| metric | this model | baseline | delta | better |", "|---|---|---|---|---|"]
    lines += metric_rows(record, baseline)
    if constraints:
        lines += ["", "Constraints: " + ", ".join(f"`{c}`" for c in constraints) + f" (feasible: {feasible})"]
    return lines


def warnings_section(record: TrialRecord) -> list[str]:
    """The "Warnings" section (metrics to distrust, and why), or nothing when there are none."""
    warnings = warning_lines(record)
    return ["", "## Warnings", ""] + warnings if warnings else []


def format_lines(
    converted: str | None, weights_format: str, pipeline_class: str = "StableDiffusionPipeline"
) -> str:
    """The model card's "Formats" section: each export format and the lines that load it."""
    lines = ["", "## Formats", ""]
    lines.append(
        "`python -m sdsweep.export <study> --to <dir> --format NAME` writes: `diffusers` (the weights as trained, "
        "loaded as under Usage), `single_file` (full fine-tune / DreamBooth: `model.safetensors`, original "
        "Stable Diffusion layout), `a1111` (the file AUTOMATIC1111 and ComfyUI load for this method)."
    )
    if converted is None:
        return "\n".join(lines) + "\n"
    lines += ["", f"This folder holds `{converted}` (format for AUTOMATIC1111 / ComfyUI / diffusers):", ""]
    if weights_format == PIPELINE_FORMAT:
        lines += [
            "- AUTOMATIC1111: copy it to `models/Stable-diffusion/`; ComfyUI: `models/checkpoints/`.",
            f"- diffusers: `{pipeline_class}.from_single_file("
            f'"{converted}", config="<base model folder or id>")`',
        ]
    elif weights_format == LORA_FORMAT:
        lines += [
            "- AUTOMATIC1111: copy it to `models/Lora/` and add `<lora:lora_kohya:1>` to the prompt; "
            "ComfyUI: `models/loras/`.",
            f'- diffusers: `pipe.load_lora_weights("path/to/this/folder", weight_name="{converted}")`',
        ]
    elif weights_format == EMBEDDINGS_FORMAT:
        lines += [
            "- AUTOMATIC1111: copy it to `embeddings/` and write its file name (`embedding`) in the prompt; "
            "ComfyUI: `models/embeddings/`, prompt `embedding:embedding`.",
            f'- diffusers: `pipe.load_textual_inversion("path/to/this/folder/{converted}", token="<token>")`'
            if pipeline_class != "StableDiffusionXLPipeline"
            else "- diffusers: load `clip_l` into `text_encoder` and `clip_g` into `text_encoder_2`, as under Usage.",
        ]
    return "\n".join(lines) + "\n"


def usage_snippet(
    fmt_name: str,
    base_model: str,
    trigger: str | None,
    prompt: str,
    scheduler: str | None = None,
    steps: int = 25,
    guidance: float = 7.5,
    pipeline_class: str = "StableDiffusionPipeline",
) -> str:
    """Python that loads the exported folder with diffusers' own loaders (matches the weights format and the
    model version: ``StableDiffusionXLPipeline`` for SDXL)."""
    prompt_literal = json.dumps(prompt)
    if fmt_name == PIPELINE_FORMAT:
        load = f'pipe = {pipeline_class}.from_pretrained("path/to/this/folder", torch_dtype=torch.float16)'
    elif fmt_name == LORA_FORMAT:
        load = (
            f'pipe = {pipeline_class}.from_pretrained("{base_model}", torch_dtype=torch.float16)\n'
            'pipe.load_lora_weights("path/to/this/folder")'
        )
    elif fmt_name == EMBEDDINGS_FORMAT and pipeline_class == "StableDiffusionXLPipeline":
        # One embedding per text encoder ("clip_l", "clip_g"), loaded encoder by encoder.
        load = (
            f'pipe = {pipeline_class}.from_pretrained("{base_model}", torch_dtype=torch.float16)\n'
            f'state = safetensors.torch.load_file("path/to/this/folder/{EMBEDS_FILE}")\n'
            'for key, encoder, tokenizer in (("clip_l", pipe.text_encoder, pipe.tokenizer), '
            '("clip_g", pipe.text_encoder_2, pipe.tokenizer_2)):\n'
            f'    pipe.load_textual_inversion(state[key], token="{trigger or "<token>"}", '
            "text_encoder=encoder, tokenizer=tokenizer)"
        )
    elif fmt_name == EMBEDDINGS_FORMAT:
        token = f', token="{trigger}"' if trigger else ""
        load = (
            f'pipe = {pipeline_class}.from_pretrained("{base_model}", torch_dtype=torch.float16)\n'
            f'pipe.load_textual_inversion("path/to/this/folder/{EMBEDS_FILE}"{token})'
        )
    else:  # register_method admits no other format; say so rather than guess one
        raise ValueError(f"No usage snippet for weights format {fmt_name!r}.")
    return (
        f"import {'safetensors.torch, ' if 'safetensors' in load else ''}torch\nfrom diffusers import {pipeline_class}\n\n"
        f"{load}\n{scheduler_lines(scheduler, fmt_name)}"
        'pipe = pipe.to("cuda")\n'
        f"image = pipe({prompt_literal}, num_inference_steps={steps}, guidance_scale={guidance}).images[0]\n"
        'image.save("sample.png")\n'
    )
