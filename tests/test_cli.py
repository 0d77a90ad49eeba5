"""``python -m sdsweep`` in a real subprocess: the demo path end to end, and bad input."""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from conftest import REPO, TINY_OVERRIDES

FAST_EVAL = ["eval.metrics=[clip_score,appropriate_rate,val_loss]"]


def run_cli(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run(
        [sys.executable, "-m", "sdsweep", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.mark.slow
def test_demo_experiment_end_to_end_in_a_subprocess(tmp_path):
    result = run_cli(
        "+experiment=demo_tiny",
        f"paths.root={tmp_path}",
        "sweep.steps=[2,4]",
        "sweep.learning_rates=[1e-4,1e-2]",
        "eval.num_inference_steps=2",
        "eval.num_images_per_prompt=1",
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    study_dir = tmp_path / "demo_tiny"
    assert str(study_dir / "results.csv") in result.stdout  # every run says where its results are
    results = pd.read_csv(study_dir / "results.csv")
    assert len(results) == 4 and (results["state"] == "COMPLETE").all()
    assert results["eval/clip_score"].map(math.isfinite).all()
    assert (study_dir / "study.db").exists()
    for trial_dir in (study_dir / d for d in results["trial_dir"]):  # relative to the study folder
        assert (trial_dir / "config.yaml").exists() and (trial_dir / "metrics.json").exists()
        assert list((trial_dir / "samples").glob("*.png"))
    # One offline W&B run per trial (plus the study-level run).
    runs = list((study_dir / "wandb").rglob("run-*.wandb"))
    assert len(runs) >= len(results)


def test_single_run_without_sweep_writes_the_same_layout(tmp_path):
    result = run_cli(
        *TINY_OVERRIDES, *FAST_EVAL, f"paths.root={tmp_path}", "study=single", "train.max_train_steps=2"
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    results = pd.read_csv(tmp_path / "single" / "results.csv")
    assert len(results) == 1 and results.loc[0, "state"] == "COMPLETE"
    assert "results.csv" in result.stdout


@pytest.mark.slow
def test_multirun_jobs_land_under_paths_root_with_their_parameters(tmp_path):
    """Hydra's -m: every job is a single run of one study, shown with the values that set it apart."""
    result = run_cli(
        "-m",
        *[o for o in TINY_OVERRIDES if not o.startswith("train.max_train_steps")],
        *FAST_EVAL,
        f"paths.root={tmp_path}",
        "study=multi",
        "train.max_train_steps=2",
        "method.learning_rate=1e-4,1e-3",
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert not (REPO / "multirun").exists() or (tmp_path / "multirun").exists()
    assert (tmp_path / "multirun").is_dir()  # Hydra's job folders under paths.root, not ./multirun
    results = pd.read_csv(tmp_path / "multi" / "results.csv")
    assert sorted(results["method.learning_rate"]) == [1e-4, 1e-3]
    assert (results["state"] == "COMPLETE").all()
    assert "trial 0 []" not in result.stdout
    report = (tmp_path / "multi" / "report.md").read_text()
    leaderboard = report.split("## Leaderboard", 1)[1]
    header = next(line for line in leaderboard.splitlines() if line.startswith("|"))
    assert "| lr |" in header  # the parameter that differs between the jobs is a column


@pytest.mark.parametrize(
    "args,expected",
    [
        (["method.learning_rate=-1e-4"], ["method.learning_rate", "greater than zero"]),
        (["+sweep=lr_steps", "sweep.steps=[0,10]"], ["train.max_train_steps", "greater than zero"]),
        (["model=sd15"], ["could not be downloaded", "model.path"]),
        (["model=sd9"], ["model/sd9", "sd15", "tiny"]),
        (["data=imagefolder", "data.path=/nonexistent/folder"], ["/nonexistent/folder"]),
    ],
)
def test_bad_input_exits_before_training_with_a_clear_message(tmp_path, args, expected):
    result = run_cli(*TINY_OVERRIDES, f"paths.root={tmp_path}", *args, timeout=120)
    assert result.returncode != 0
    output = result.stdout + result.stderr
    for fragment in expected:
        assert fragment in output, output[-2000:]
    assert not list(tmp_path.rglob("trials"))  # nothing trained


def test_corrupt_image_is_named_before_training(tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    (folder / "broken.png").write_bytes(b"not a png at all")
    (folder / "metadata.jsonl").write_text('{"file_name": "broken.png", "text": "a photo of sks"}\n')
    result = run_cli(
        *TINY_OVERRIDES,
        f"paths.root={tmp_path / 'exp'}",
        "data=imagefolder",
        f"data.path={folder}",
        timeout=120,
    )
    assert result.returncode == 2
    assert "broken.png" in result.stderr


def run_from(folder: Path, *args: str) -> subprocess.CompletedProcess:
    """The entry point run from an unrelated folder (as the installed console script is)."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"}
    return subprocess.run(
        [sys.executable, "-c", "from sdsweep.__main__ import main; main()", *args],
        cwd=folder,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_help_teaches_the_commands_from_any_folder(tmp_path):
    result = run_from(tmp_path, "--help")
    assert result.returncode == 0, result.stderr[-2000:]
    out = result.stdout
    assert "hyperparameter sweeps for fine-tuning Stable Diffusion" in out
    for command in (
        "+experiment=demo",
        "data.path=",
        "sdsweep.report",
        "sdsweep.export",
        "--plan",
    ):
        assert command in out
    assert re.search(r"sweep: .*lr_steps.*methods.*tpe", out) and "model: sd15" in out  # the config groups
    assert "method: dreambooth, full, lora, textual_inversion\n" in out  # no internal *_schema entry
    assert "powered by Hydra" not in out


def test_plan_shows_the_effective_grid_and_loads_nothing(tmp_path):
    result = run_from(
        tmp_path, "--plan", "+experiment=demo_tiny", "sweep.steps=[2,4]", f"paths.root={tmp_path}"
    )
    assert result.returncode == 0, result.stderr[-2000:]
    out = result.stdout
    assert "train.max_train_steps: 2, 4" in out  # the override, not the recipe's 10/20/40
    assert "grid: 4 points in 2 training run(s)" in out
    assert "milestones 2/4" in out
    assert "estimated training steps: 8 (12 without milestone sharing)" in out
    # Nothing trained or stored (Hydra itself writes only its run folder's log).
    assert not [p for p in tmp_path.rglob("*") if p.is_file() and "hydra" not in p.parts]
    assert "torchvision" not in result.stderr
