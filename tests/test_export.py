"""Export and generate, on a copy of the real finished study (session fixture ``finished_study``)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

from sdsweep import io
from sdsweep.results.export import TRIAL_FILE, ExportError, export_trial, main
from sdsweep.results.table import write_results


def copy_study(study: Path, tmp_path: Path) -> Path:
    target = tmp_path / study.name
    shutil.copytree(study, target, ignore=shutil.ignore_patterns("wandb", "report*"))
    return target


def expected_best(study: Path) -> int:
    """The rule, restated from the files: best feasible COMPLETE trial, ties -> lower number."""
    info = json.loads((study / "study.json").read_text())
    direction = info["objectives"][0]["direction"]
    results = pd.read_csv(study / "results.csv")
    pool = results[(results["state"] == "COMPLETE") & results["feasible"].fillna(True).astype(bool)]
    return int(
        pool.sort_values(["objective", "trial"], ascending=[direction == "minimize", True]).iloc[0]["trial"]
    )


def set_records(study: Path, **changes) -> None:
    for trial_dir in io.StudyPaths(study).trial_dirs():
        record = io.read_json(trial_dir / io.TRIAL_METRICS)
        record.update(changes)
        io.atomic_write_json(trial_dir / io.TRIAL_METRICS, record)
    write_results(io.StudyPaths(study))


def test_export_copies_the_best_trial_with_a_model_card(finished_study, tmp_path):
    best = expected_best(finished_study)
    out = export_trial(finished_study, tmp_path / "model")
    weights = io.StudyPaths(finished_study).trial(best) / io.TRIAL_WEIGHTS
    rewritten = {"model_index.json", "scheduler/scheduler_config.json"}  # the judged scheduler, by design
    for source in weights.rglob("*"):
        if source.is_file() and str(source.relative_to(weights)) not in rewritten:
            assert (out / source.relative_to(weights)).read_bytes() == source.read_bytes()
    summary = json.loads((out / TRIAL_FILE).read_text())
    record = io.read_json(io.StudyPaths(finished_study).trial(best) / io.TRIAL_METRICS)
    assert summary["trial"] == best
    assert summary["metrics"] == record["metrics"]
    assert summary["params"] == record["params"]
    card = (out / "README.md").read_text()
    front = card.split("---")[1]
    assert f'base_model: "{record["pretrained"]}"' in front
    for tag in ("stable-diffusion", "text-to-image", "diffusers", "sdsweep", record["method"]):
        assert f"- {tag}\n" in front
    assert "StableDiffusionPipeline.from_pretrained" in card
    assert "| `eval/clip_score` ↑ |" in card and "| `eval/fd_clip` ↓ |" in card  # metrics with direction
    assert "fid_reliable" not in card  # an internal flag, not a metric
    info = json.loads((finished_study / "study.json").read_text())
    for prompt in info["eval"]["prompts"]:
        assert f"  - `{prompt}`" in card
    seeds = ", ".join(str(s) for s in info["eval"]["seeds"])
    assert f"- Seeds: {seeds}" in card
    steps = info["eval"]["num_inference_steps"]
    assert (
        f"- Sampler: `dpmsolver++` (DPMSolverMultistepScheduler), {steps} steps, guidance scale 7.5" in card
    )
    assert f"num_inference_steps={steps}, guidance_scale=7.5" in card  # usage runs what was judged
    assert "## Training data" in card and "- `trigger_word`: sks" in card and "- `num_heldout`:" in card
    assert "**Test model.** `tiny:sd15` is a tiny, randomly initialised model" in card
    for warning in record["warnings"]:
        assert f"- ⚠ {warning}" in card
    assert "![samples](samples_grid.png)" in card
    assert Image.open(out / "samples_grid.png").size == Image.open(weights.parent / io.TRIAL_GRID).size


def test_exported_full_pipeline_loads_with_diffusers(finished_study, tmp_path):
    from diffusers import StableDiffusionPipeline

    out = export_trial(finished_study, tmp_path / "model")
    pipe = StableDiffusionPipeline.from_pretrained(
        str(out), safety_checker=None, requires_safety_checker=False
    )
    assert pipe.unet.config.sample_size > 0
    # The pipeline samples with the scheduler every trial was judged with, not the training PNDM.
    assert type(pipe.scheduler).__name__ == "DPMSolverMultistepScheduler"
    assert pipe.scheduler.config.algorithm_type == "dpmsolver++"
    trained = io.read_json(
        io.StudyPaths(finished_study).trial(expected_best(finished_study))
        / "weights/scheduler/scheduler_config.json"
    )
    for key in ("beta_start", "beta_end", "beta_schedule", "num_train_timesteps", "prediction_type"):
        assert pipe.scheduler.config[key] == trained[key]  # the noise schedule is the trained one


def test_export_schedulers_match_the_evaluation_schedulers(tmp_path):
    """export_card.SCHEDULERS writes the same class (and settings) as models.make_inference_scheduler."""
    from diffusers import PNDMScheduler

    from sdsweep.models.loading import make_inference_scheduler
    from sdsweep.results.export_card import SCHEDULERS, set_pipeline_scheduler

    base = dict(PNDMScheduler(skip_prk_steps=True).config)
    for name, (cls, extra) in SCHEDULERS.items():
        made = make_inference_scheduler(name, base)
        assert type(made).__name__ == cls
        for key, value in extra.items():
            assert made.config[key] == value
        folder = tmp_path / name
        io.atomic_write_json(
            folder / "scheduler" / "scheduler_config.json", {"_class_name": "PNDMScheduler", **base}
        )
        io.atomic_write_json(folder / "model_index.json", {"scheduler": ["diffusers", "PNDMScheduler"]})
        assert set_pipeline_scheduler(folder, name) == cls
        assert io.read_json(folder / "model_index.json")["scheduler"] == ["diffusers", cls]


def test_model_card_lists_the_prompts_and_prior_prompts_the_metrics_were_measured_with():
    from sdsweep.results.export_card import eval_lines

    recorded = {"prompts": ["a photo of sks dog"], "prior_prompts": ["a photo of a dog"], "seeds": [1234]}
    lines = eval_lines({"eval": recorded}, {"eval": {"scheduler": "dpmsolver++"}})
    assert lines[-4:] == [
        "- Prompts:",
        "  - `a photo of sks dog`",
        "- Prior prompts (language drift, `eval/prior_clip_score`):",
        "  - `a photo of a dog`",
    ]
    assert not any("Prior" in line for line in eval_lines({"eval": {"prompts": ["x"]}}, {}))


def test_export_refuses_a_non_empty_folder_unless_forced(finished_study, tmp_path):
    target = tmp_path / "model"
    target.mkdir()
    (target / "old.txt").write_text("keep me")
    with pytest.raises(ExportError, match="not empty"):
        export_trial(finished_study, target)
    export_trial(finished_study, target, force=True)
    assert not (target / "old.txt").exists() and (target / TRIAL_FILE).is_file()


def test_deleted_weights_name_the_trial_and_how_to_rerun(finished_study, tmp_path):
    study = copy_study(finished_study, tmp_path)
    best = expected_best(study)
    shutil.rmtree(io.StudyPaths(study).trial(best) / io.TRIAL_WEIGHTS)
    with pytest.raises(ExportError) as error:
        export_trial(study, tmp_path / "model")
    message = str(error.value)
    assert f"Trial {best} has no weights" in message
    assert "python -m sdsweep" in message and f"-t{best:04d}" in message
    assert "sweep.keep_best_k=-1" in message
    assert not (tmp_path / "model").exists()


def test_no_feasible_trial_exports_what_the_sweep_called_best_with_a_warning(
    finished_study, tmp_path, capsys
):
    from sdsweep.results.table import best_trial

    study = copy_study(finished_study, tmp_path)
    set_records(study, feasible=False, violations=["eval/appropriate_rate = 0.5 < 0.75"])
    results = pd.read_csv(study / "results.csv")
    called_best = best_trial(results, "maximize", feasible_only=False)  # what the sweep prints as best
    out = export_trial(study, tmp_path / "a")
    assert json.loads((out / TRIAL_FILE).read_text())["trial"] == int(called_best["trial"])
    card = (out / "README.md").read_text()
    assert "This trial violates the study's constraints" in card and "0.5 < 0.75" in card
    set_records(study, state="FAIL", fail_reason="training diverged")
    with pytest.raises(ExportError, match="has no COMPLETE trial"):
        export_trial(study, tmp_path / "b")
    assert main([str(study), "--to", str(tmp_path / "c"), "--trial", "0"]) == 2
    assert "is FAIL (training diverged)" in capsys.readouterr().err


def test_explicit_trial_is_exported(finished_study, tmp_path):
    results = pd.read_csv(finished_study / "results.csv")
    chosen = int(results[results["state"] == "COMPLETE"]["trial"].max())
    assert main([str(finished_study), "--to", str(tmp_path / "m"), "--trial", str(chosen)]) == 0
    assert json.loads((tmp_path / "m" / TRIAL_FILE).read_text())["trial"] == chosen


@pytest.mark.slow
def test_generate_writes_reproducible_pngs(finished_study, tmp_path, capsys):
    from sdsweep.config.load import load_yaml
    from sdsweep.config.resolve import resolved_resolution
    from sdsweep.results.generate import main as generate_main

    args = [str(finished_study), "--prompt", "a photo of sks", "--num-images", "2", "--steps", "2"]
    assert generate_main(args + ["--out", str(tmp_path / "a")]) == 0
    assert generate_main(args + ["--out", str(tmp_path / "b")]) == 0
    first = sorted((tmp_path / "a").glob("*.png"))
    assert [p.name for p in first] == [
        f"t{expected_best(finished_study):04d}_a-photo-of-sks_s{s}.png" for s in (0, 1)
    ]
    assert [p.read_bytes() for p in first] == [p.read_bytes() for p in sorted((tmp_path / "b").glob("*.png"))]
    cfg = load_yaml(str(io.StudyPaths(finished_study).trial(expected_best(finished_study)) / io.TRIAL_CONFIG))
    size = cfg.eval.resolution or resolved_resolution(cfg)
    assert Image.open(first[0]).size == (size, size)
    assert str(first[0]) in capsys.readouterr().out


@pytest.mark.slow
def test_generate_baseline_to_a_file(finished_study, tmp_path):
    from sdsweep.results.generate import main as generate_main

    out = tmp_path / "base.png"
    assert (
        generate_main(
            [
                str(finished_study),
                "--trial",
                "baseline",
                "--prompt",
                "x",
                "--num-images",
                "1",
                "--steps",
                "2",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    assert Image.open(out).width > 0
