"""W&B tracking: real offline runs, read back from their .wandb transaction logs."""

from __future__ import annotations

import json
import math

import pandas as pd
import pytest
from conftest import TINY_OVERRIDES, compose
from PIL import Image

from sdsweep import tracking, wandb_records


@pytest.fixture
def wandb_cfg(tmp_path):
    cfg = compose(TINY_OVERRIDES + ["tracking=wandb", "tracking.tags=[unit]", f"paths.root={tmp_path}"])
    assert cfg.tracking.mode == "offline"
    return cfg


def trial_record(lr: float, steps: int) -> dict:
    history = [{"step": s, "train/loss": 1.0 / s, "train/lr": lr} for s in range(1, steps + 1)]
    evals = [{"step": m, "eval/clip_score": 20.0 + m, "eval/fid": float("nan")} for m in (2, steps)]
    return {
        "trial": 3,
        "state": "COMPLETE",
        "model": "tiny",
        "method": "full",
        "metrics": {"eval/clip_score": 20.0 + steps, "eval/fid": float("nan")},
        "delta": {"delta/eval/clip_score": 1.5},
        "fail_reason": None,
        "feasible": True,
        "objective": 20.0 + steps,
        "history": history,
        "evals": evals,
    }


def test_secret_keys_are_recognised():
    assert tracking.is_secret_key("tracking.api_key")
    assert tracking.is_secret_key("WANDB_API_KEY")
    assert tracking.is_secret_key("hub.token")
    assert tracking.is_secret_key("db.password")
    assert tracking.is_secret_key("aws_secret_access")
    assert not tracking.is_secret_key("method.learning_rate")
    assert not tracking.is_secret_key("method.placeholder_token")  # a vocabulary token, not a credential
    assert tracking.strip_secrets({"a": 1, "x.token": "t", "n": {"password": "p", "b": 2}}) == {
        "a": 1,
        "n": {"b": 2},
    }


def test_history_merges_steps_in_order():
    images = {"eval/grid": [(4, "img4"), (2, "img2")]}
    rows = tracking.history_by_step(trial_record(1e-4, 4), images)
    assert [step for step, _ in rows] == [1, 2, 3, 4]
    by_step = dict(rows)
    assert by_step[2]["eval/clip_score"] == 22.0 and by_step[2]["eval/grid"] == "img2"
    assert by_step[4]["train/loss"] == 0.25 and by_step[4]["eval/fid"] is None  # NaN is not logged


def test_disabled_tracking_returns_none_and_writes_nothing(tiny_cfg, tmp_path):
    assert tiny_cfg.tracking.backend == "none"
    assert tracking.record_trial(tiny_cfg, "s", 0, {}, trial_record(1e-4, 2), {}, tmp_path / "wb") is None
    assert not (tmp_path / "wb").exists()


def test_record_trial_writes_a_readable_offline_run(wandb_cfg, tmp_path, monkeypatch):
    monkeypatch.setenv("MY_API_KEY", "do-not-log-me")
    run_dir = tmp_path / "wandb"
    params = {"method.learning_rate": 1e-4, "train.max_train_steps": 4}
    grid = [(2, Image.new("RGB", (16, 8), "red")), (4, Image.new("RGB", (16, 8), "blue"))]
    run_id = tracking.record_trial(
        wandb_cfg, "my-study", 3, params, trial_record(1e-4, 4), {"eval/grid": grid}, run_dir
    )
    assert run_id

    [folder] = wandb_records.run_dirs(run_dir)
    run = wandb_records.read_run(folder)
    assert run["id"] == run_id
    assert run["run"]["group"] == "my-study"
    assert run["run"]["job_type"] == "full"
    assert run["run"]["name"] == "t003 lr=1e-04 steps=4"
    assert run["run"]["tags"] == ["tiny", "full", "unit"]
    assert run["config"]["method.learning_rate"] == 1e-4
    assert run["config"]["train.max_train_steps"] == 4
    assert run["config"]["model.name"] == "tiny"
    assert run["config"]["trial"] == 3
    assert "do-not-log-me" not in json.dumps(run)
    assert wandb_records.history_of(run, "train/loss") == [(s, 1.0 / s) for s in range(1, 5)]
    assert wandb_records.history_of(run, "eval/clip_score") == [(2, 22.0), (4, 24.0)]
    images = wandb_records.history_of(run, "eval/grid")
    assert [step for step, _ in images] == [2, 4]
    assert all(value["_type"] == "image-file" and value["width"] == 16 for _, value in images)
    media = [m for m in run["media"] if m.startswith("media/images/eval/grid")]
    assert len(media) == 2
    assert sorted(Image.open(folder / "files" / m).getpixel((0, 0)) for m in media) == [
        (0, 0, 255),
        (255, 0, 0),
    ]
    assert run["summary"]["state"] == "COMPLETE"
    assert run["summary"]["eval/clip_score"] == 24.0
    assert run["summary"]["fail_reason"] is None
    assert run["exit_code"] == 0


def test_failed_trial_is_recorded_with_its_reason(wandb_cfg, tmp_path):
    record = {
        "state": "FAIL",
        "fail_reason": "training diverged: loss is NaN",
        "metrics": {},
        "method": "full",
        "model": "tiny",
        "history": [{"step": 1, "train/loss": float("nan"), "train/lr": 1e-2}],
    }
    run_id = tracking.record_trial(wandb_cfg, "s", 7, {"method.learning_rate": 1e-2}, record, {}, tmp_path)
    run = wandb_records.read_run(wandb_records.run_dirs(tmp_path)[0])
    assert run["id"] == run_id
    assert run["summary"]["state"] == "FAIL"
    assert run["summary"]["fail_reason"] == "training diverged: loss is NaN"
    assert wandb_records.history_of(run, "train/lr") == [(1, 1e-2)]


def test_wandb_errors_become_a_warning_not_an_exception(wandb_cfg, tmp_path):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where W&B wants a folder")
    with pytest.warns(RuntimeWarning, match="W&B tracking skipped for trial 0"):
        assert tracking.record_trial(wandb_cfg, "s", 0, {}, trial_record(1e-4, 2), {}, blocker) is None


def test_record_study_logs_the_table_plots_and_best_trial(wandb_cfg, tmp_path):
    wandb_cfg.sweep = compose(TINY_OVERRIDES + ["+sweep=lr_steps"]).sweep
    results = pd.DataFrame(
        [
            {
                "trial": -1,
                "state": "BASELINE",
                "method": "baseline (untuned)",
                "eval/clip_score": 20.0,
                "objective": math.nan,
            },
            {
                "trial": 0,
                "state": "COMPLETE",
                "method.learning_rate": 1e-4,
                "eval/clip_score": 21.0,
                "objective": 21.0,
                "feasible": True,
            },
            {
                "trial": 1,
                "state": "COMPLETE",
                "method.learning_rate": 1e-3,
                "eval/clip_score": 23.0,
                "objective": 23.0,
                "feasible": False,
            },
            {
                "trial": 2,
                "state": "FAIL",
                "method.learning_rate": 1e-2,
                "eval/clip_score": math.nan,
                "objective": math.nan,
            },
        ]
    )
    plot = tmp_path / "heatmap_clip_score.png"
    Image.new("RGB", (20, 10), "green").save(plot)
    run_id = tracking.record_study(
        wandb_cfg, "my-study", results, {"heatmap_clip_score": plot}, tmp_path / "wb"
    )
    [folder] = wandb_records.run_dirs(tmp_path / "wb")
    run = wandb_records.read_run(folder)
    assert run["id"] == run_id
    assert run["run"]["job_type"] == "study" and run["run"]["group"] == "my-study"
    table = wandb_records.read_table(folder, run, "trials")
    assert table["columns"] == list(results.columns)
    assert [row[0] for row in table["data"]] == [-1, 0, 1, 2]
    assert table["data"][3][table["columns"].index("eval/clip_score")] is None
    assert any(m.startswith("media/images/plots/heatmap_clip_score") for m in run["media"])
    assert run["summary"]["best/trial"] == 0  # trial 1 scores higher but violates a constraint
    assert run["summary"]["num_trials"] == 3
