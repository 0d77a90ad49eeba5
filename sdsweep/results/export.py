"""Export a study's best trial as a ready-to-share diffusers model folder with a model card.

``python -m sdsweep.export experiments/<study> --to <dir> [--trial N] [--force]``

The best trial is ``sdsweep.results.study_folder.best_trial`` over the study's objectives, the same trial the sweep,
the report and W&B call best: the best feasible COMPLETE trial; with several objectives the Pareto-front
member closest to the utopia point. When no COMPLETE trial is feasible the sweep still names the best
infeasible one, so export exports it too, with the violated constraints at the top of the model card.
A pipeline is exported with the scheduler the trials were judged with (study.json ``eval.scheduler``). ``<dir>`` receives the trial's ``weights/`` exactly as the
method saved them (a pipeline folder, ``pytorch_lora_weights.safetensors`` or
``learned_embeds.safetensors``), a ``README.md`` model card, ``samples_grid.png`` and
``sdsweep_trial.json``. No torch import: exporting is copying files and writing text.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from sdsweep import io
from sdsweep.config.methods import METHOD_SPECS, PIPELINE_FORMAT, method_spec
from sdsweep.metric_names import fmt_param
from sdsweep.results import export_card
from sdsweep.results.study_folder import StudyData, StudyFolderError, best_trial, is_feasible, load_study
from sdsweep.study.record import TrialRecord, TrialState

CARD_TAGS = ["stable-diffusion", "text-to-image", "diffusers", "sdsweep"]
TRIAL_FILE = "sdsweep_trial.json"
GRID_FILE = "samples_grid.png"


class ExportError(RuntimeError):
    """Nothing suitable to export; the message names the trial and what to do."""


@dataclass
class SelectedTrial:
    number: int
    record: TrialRecord
    trial_dir: Path


def select_trial(data: StudyData, trial: int | None = None) -> SelectedTrial:
    """The requested trial, or the best feasible COMPLETE one; raises ``ExportError`` with the fix."""
    study = data.info.get("study", data.root.name)
    if trial is None:
        states = data.results["state"].value_counts().to_dict() if not data.results.empty else {}
        if states.get(TrialState.COMPLETE.value, 0) == 0:
            shown = ", ".join(f"{n} {s}" for s, n in sorted(states.items())) or "no trials"
            raise ExportError(
                f"Study '{study}' has no COMPLETE trial ({shown}); nothing to export. "
                "Check the fail reasons in results.csv or report.html and run the sweep again."
            )
        # The one rule: the same trial the sweep and W&B name as best, even when none is feasible.
        best = best_trial(data.results, data.objectives)
        if best is None:
            constraints = ", ".join(data.info.get("constraints") or [])
            raise ExportError(
                f"No COMPLETE trial of study '{study}' has every objective value ({constraints or 'no constraints'}). "
                "Pick one explicitly with --trial N (see the leaderboard in report.html)."
            )
        trial = int(best["trial"])
    record = data.records.get(trial)
    if record is None:
        raise ExportError(
            f"Trial {trial} of study '{study}' has no {io.TRIAL_METRICS}; known trials: {sorted(data.records)}."
        )
    if not record.complete:
        raise ExportError(
            f"Trial {trial} of study '{study}' is {record.state.value} ({record.fail_reason or 'no reason recorded'}); "
            "only COMPLETE trials can be exported."
        )
    return SelectedTrial(trial, record, data.paths.trial(trial))


def rerun_command(data: StudyData, record: TrialRecord) -> str:
    """A command that trains this grid point again as its own single-run study (which keeps its weights)."""
    from sdsweep.study.plan import overrides_for

    study = data.info.get("study", data.root.name)
    base = [o for o in data.info.get("overrides") or [] if not o.lstrip("+").startswith(("sweep", "study="))]
    params = overrides_for(record.params)
    args = base + params + [f"study={study}-t{int(record.trial or 0):04d}"]
    return "python -m sdsweep " + " ".join(_quote(a) for a in args)


def _quote(arg: str) -> str:
    import shlex

    return shlex.quote(arg)


def weights_dir(data: StudyData, selected: SelectedTrial) -> Path:
    """The trial's weights folder; raises ``ExportError`` naming the trial and how to re-run it."""
    relative = selected.record.weights
    folder = selected.trial_dir / (relative or io.TRIAL_WEIGHTS)
    if relative and folder.is_dir() and any(folder.iterdir()):
        return folder
    why = selected.record.weights_removed or "the weights folder is missing"
    raise ExportError(
        f"Trial {selected.number} has no weights to export ({why}; expected {folder}). "
        f"Train it again with:\n  {rerun_command(data, selected.record)}\n"
        "or keep every trial's weights in future sweeps with sweep.keep_best_k=-1."
    )


def weights_format(folder: Path, method: str | None = None) -> str:
    """``pipeline`` | ``lora`` | ``textual_inversion``: the trial's method says (``MethodSpec``), and the
    file that method saves must be there; a record without a method is matched against every spec."""
    spec = method_spec(str(method)) if method else None
    specs = [spec] if spec is not None else list(METHOD_SPECS.values())
    for spec in specs:
        if (folder / spec.weights_file).is_file():
            return spec.weights_format
    expected = " or ".join(sorted({spec.weights_file for spec in specs}))
    raise ExportError(f"{folder} holds no diffusers weights of method {method or '?'} (no {expected}).")


def _trial_config(selected: SelectedTrial) -> dict[str, Any]:
    """The trial's saved config as plain data (not validated: exporting must not depend on conf/)."""
    from omegaconf import OmegaConf

    path = selected.trial_dir / io.TRIAL_CONFIG
    if not path.is_file():
        return {}
    container = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    return container if isinstance(container, dict) else {}


def trigger_of(data: StudyData, config: dict[str, Any]) -> str | None:
    """The word that calls up the learned concept: the method's own token (textual inversion's placeholder,
    ``MethodSpec.concept_token_option``), else the data's trigger word."""
    method = config.get("method") or {}
    spec = method_spec(str(data.info.get("method") or method.get("name")))
    if spec is not None and spec.concept_token_option:
        return data.info.get("placeholder_token") or method.get(spec.concept_token_option)
    return data.info.get("trigger_word") or (config.get("data") or {}).get("trigger_word")


def hyperparameters(record: TrialRecord, config: dict[str, Any]) -> dict[str, Any]:
    """The swept params first, then the training settings that matter to reproduce the trial."""
    train = config.get("train") or {}
    method = config.get("method") or {}
    values: dict[str, Any] = dict(record.params)
    learning_rate = record.learning_rate if record.learning_rate is not None else method.get("learning_rate")
    values.setdefault("method.learning_rate", learning_rate)
    values.setdefault("train.max_train_steps", record.max_train_steps or record.step)
    for key in (
        "train_batch_size",
        "gradient_accumulation_steps",
        "lr_scheduler",
        "lr_warmup_steps",
        "seed",
        "snr_gamma",
    ):
        if key in train:
            values.setdefault(f"train.{key}", train[key])
    spec = method_spec(str(method.get("name", record.method)))
    for key in spec.card_options if spec else ():
        if key in method:
            values.setdefault(f"method.{key}", method[key])
    return values


def model_card(
    data: StudyData,
    selected: SelectedTrial,
    fmt_name: str,
    config: dict[str, Any],
    has_grid: bool,
    pipeline_class: str = "StableDiffusionPipeline",
) -> str:
    """The export's README.md: Hub front matter, where the model comes from, data, hyperparameters, how it
    was judged, metrics against the untuned base, warnings, usage and (when there is one) the samples grid."""
    record = selected.record
    method = str(record.method or data.info.get("method"))
    base_model = str(record.pretrained or data.info.get("pretrained") or data.info.get("model"))
    trigger = trigger_of(data, config)
    feasible = is_feasible(record.feasible)
    lines = _provenance_lines(data, selected, base_model, method, feasible)
    lines += export_card.base_model_note(base_model, record.model or data.info.get("model"))
    lines += export_card.summary_lines(base_model, method, fmt_name, trigger)
    lines += ["", "## Training data", ""] + export_card.data_lines(data.info, config)
    lines += _hyperparameter_lines(record, config)
    lines += ["", "## Evaluation", "", "Every trial and the untuned baseline were judged with:", ""]
    lines += export_card.eval_lines(data.info, config)
    constraints = data.info.get("constraints") or []
    lines += export_card.metrics_section(record, data.baseline_metrics, constraints, feasible)
    lines += export_card.warnings_section(record)
    lines += _usage_lines(data, fmt_name, base_model, trigger, config, pipeline_class)
    if has_grid:
        lines += [
            "## Samples",
            "",
            "Validation prompts (rows) × seeds (columns):",
            "",
            f"![samples]({GRID_FILE})",
            "",
        ]
    return "\n".join(_front_matter(base_model, method) + lines)


def _front_matter(base_model: str, method: str) -> list[str]:
    """The YAML header the Hugging Face Hub reads: base model, library and tags."""
    front = ["---", f"base_model: {json.dumps(base_model)}", "library_name: diffusers", "tags:"]
    front += [f"- {t}" for t in CARD_TAGS + [method]]
    return front + ["---", ""]


def _provenance_lines(
    data: StudyData, selected: SelectedTrial, base_model: str, method: str, feasible: bool
) -> list[str]:
    """The title, a warning when the trial violates the constraints, and which trial of which study it is."""
    record = selected.record
    lines = [f"# {data.info.get('study', data.root.name)} · trial {selected.number:04d}", ""]
    if not feasible:
        violated = "; ".join(record.failed_constraints()) or "see sdsweep_trial.json"
        lines += [
            "> ⚠ **This trial violates the study's constraints** "
            f"({', '.join(data.info.get('constraints') or [])}: {violated}). No trial of the study satisfied "
            "them; it is exported because it is the best one the sweep reported.",
            "",
        ]
    how = "best trial" if feasible else "best (infeasible) trial"
    if len(data.objectives) > 1:
        how += ", the Pareto-front member closest to the utopia point,"
    objectives = ", ".join(f"{d} `{m}`" for m, d in data.objectives)
    lines.append(
        f"Fine-tuned from `{base_model}` with **{method}** by sdsweep "
        f"({how} of study `{data.info.get('study')}`: {objectives})."
    )
    return lines


def _hyperparameter_lines(record: TrialRecord, config: dict[str, Any]) -> list[str]:
    """The "Hyperparameters" table (``hyperparameters``: swept params first)."""
    lines = ["", "## Hyperparameters", "", "| parameter | value |", "|---|---|"]
    for key, value in hyperparameters(record, config).items():
        lines.append(f"| `{key}` | {fmt_param(key, value)} |")
    return lines


def _usage_lines(
    data: StudyData,
    fmt_name: str,
    base_model: str,
    trigger: str | None,
    config: dict[str, Any],
    pipeline_class: str,
) -> list[str]:
    """The "Usage" section: loading code with the sampler, steps and guidance the metrics were measured with."""
    evaluation = {**(config.get("eval") or {}), **(data.info.get("eval") or {})}
    prompts = evaluation.get("prompts") or [f"a photo of {trigger or 'sks'}"]
    snippet = export_card.usage_snippet(
        fmt_name,
        base_model,
        trigger,
        prompts[0],
        scheduler=evaluation.get("scheduler"),
        steps=int(evaluation.get("num_inference_steps") or 25),
        guidance=float(evaluation.get("guidance_scale") or 7.5),
        pipeline_class=pipeline_class,
    )
    return ["", "## Usage", "", "```python", snippet.rstrip(), "```", ""]


def trial_summary(
    data: StudyData, selected: SelectedTrial, fmt_name: str, files: list[str]
) -> dict[str, Any]:
    record = selected.record
    metric, direction = data.objective
    return {
        "study": data.info.get("study"),
        "study_dir": str(data.root.resolve()),
        "trial": selected.number,
        "state": record.state.value,
        "model": record.model,
        "pretrained": record.pretrained or data.info.get("pretrained"),
        "method": record.method,
        "weights_format": fmt_name,
        "params": record.params,
        "objective": {"metric": metric, "direction": direction, "value": record.objective},
        "metrics": record.metrics,
        "delta": record.delta,
        "baseline": data.baseline_metrics,
        "feasible": record.feasible,
        "constraints": data.info.get("constraints"),
        "eval": data.info.get("eval"),
        "files": files,
        "exported_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def export_trial(
    study_dir: Path, to: Path, trial: int | None = None, force: bool = False, fmt: str = "diffusers"
) -> Path:
    """Copy the chosen trial's weights to ``to`` (or convert them to ``fmt``) with a model card; returns ``to``."""
    from sdsweep.results import export_formats

    data = load_study(study_dir)
    selected = select_trial(data, trial)
    source = weights_dir(data, selected)
    fmt_name = weights_format(source, selected.record.method)
    config = _trial_config(selected)
    version = export_formats.trained_version(source, fmt_name, config)
    try:
        export_formats.output_file(fmt, fmt_name)
    except export_formats.FormatError as error:
        raise ExportError(str(error)) from None
    to = Path(to)
    if to.exists() and any(to.iterdir()) and not force:
        raise ExportError(f"{to} exists and is not empty; choose another --to or pass --force to overwrite.")
    # Copy into a staging folder and swap it in, so a failed export never leaves half a model.
    staging = io.staging_dir(to)
    try:
        spec = method_spec(str(selected.record.method))
        converted = export_formats.convert(
            source,
            fmt_name,
            spec.weights_file if spec else "",
            fmt,
            staging,
            export_formats.lora_alphas(config),
        )
        if converted is None:
            shutil.copytree(source, staging, dirs_exist_ok=True)
        if (
            fmt_name == PIPELINE_FORMAT and converted is None
        ):  # load with the sampler the metrics were measured with, not PNDM
            export_card.set_pipeline_scheduler(staging, (data.info.get("eval") or {}).get("scheduler"))
        if (selected.trial_dir / io.TRIAL_CONFIG).is_file():  # generate and the app load the export with it
            shutil.copyfile(selected.trial_dir / io.TRIAL_CONFIG, staging / export_formats.EXPORT_CONFIG)
        grid = selected.trial_dir / io.TRIAL_GRID
        if grid.is_file():
            shutil.copyfile(grid, staging / GRID_FILE)
        card = model_card(data, selected, fmt_name, config, grid.is_file(), version.pipeline_class)
        io.atomic_write_text(
            staging / "README.md",
            card + export_card.format_lines(converted, fmt_name, version.pipeline_class),
        )
        files = sorted(str(p.relative_to(staging)) for p in staging.rglob("*") if p.is_file())
        io.atomic_write_json(
            staging / TRIAL_FILE, trial_summary(data, selected, fmt_name, files + [TRIAL_FILE])
        )
        io.replace_dir(staging, to)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return to


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Export the best (or a chosen) trial of a sdsweep study.")
    parser.add_argument("study_dir", type=Path, help="experiments/<study>")
    parser.add_argument("--to", type=Path, required=True, help="output folder for the model")
    parser.add_argument(
        "--trial", type=int, default=None, help="trial number (default: the best feasible trial)"
    )
    parser.add_argument("--force", action="store_true", help="overwrite a non-empty --to folder")
    parser.add_argument(
        "--format",
        default="diffusers",
        choices=["diffusers", "single_file", "a1111"],
        help="diffusers (as trained); single_file (full/DreamBooth: one original-layout .safetensors); "
        "a1111 (what AUTOMATIC1111/ComfyUI load: checkpoint, kohya LoRA or emb_params embedding)",
    )
    args = parser.parse_args(argv)
    try:
        out = export_trial(args.study_dir, args.to, args.trial, args.force, args.format)
    except (ExportError, StudyFolderError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    summary = io.read_json(out / TRIAL_FILE) or {}
    if not is_feasible(summary.get("feasible")):
        print(
            f"warning: trial {summary.get('trial')} violates the study's constraints "
            f"({', '.join(summary.get('constraints') or [])}); no trial satisfied them. See {out / 'README.md'}.",
            file=sys.stderr,
        )
    print(
        f"exported trial {summary.get('trial')} ({summary.get('method')}, {summary.get('weights_format')}) to {out}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
