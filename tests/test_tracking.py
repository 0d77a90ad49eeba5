"""W&B tracking: real offline runs, read back from their .wandb transaction logs."""

from __future__ import annotations

import json
import math

import pandas as pd
import pytest
import wandb_records
from conftest import TINY_OVERRIDES, compose
from PIL import Image

from sdsweep.sweep import tracking, tracking_values


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
    assert tracking_values.is_secret_key("tracking.api_key")
    assert tracking_values.is_secret_key("WANDB_API_KEY")
    assert tracking_values.is_secret_key("hub.token")
    assert tracking_values.is_secret_key("db.password")
    assert tracking_values.is_secret_key("aws_secret_access")
    assert not tracking_values.is_secret_key("method.learning_rate")
    assert not tracking_values.is_secret_key(
        "method.placeholder_token"
    )  # a vocabulary token, not a credential
    assert tracking_values.strip_secrets({"a": 1, "x.token": "t", "n": {"password": "p", "b": 2}}) == {
        "a": 1,
        "n": {"b": 2},
    }
    storage = {"sweep.storage": "postgresql+psycopg://me:hunter2@db:5432/optuna"}
    assert tracking_values.strip_secrets(storage) == {
        "sweep.storage": "postgresql+psycopg://me:***@db:5432/optuna"
    }


def test_history_merges_steps_in_order():
    images = {"eval/grid": [(4, "img4"), (2, "img2")]}
    rows = tracking_values.history_by_step(trial_record(1e-4, 4), images)
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
    run = wandb_records.read_finished_run(folder)
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
    run = wandb_records.read_finished_run(wandb_records.run_dirs(tmp_path)[0])
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
    run = wandb_records.read_finished_run(folder)
    assert run["id"] == run_id
    assert run["run"]["job_type"] == "study" and run["run"]["group"] == "my-study"
    table = wandb_records.read_table(folder, run, "trials")
    assert table["columns"] == list(results.columns)
    assert [row[0] for row in table["data"]] == [-1, 0, 1, 2]
    assert table["data"][3][table["columns"].index("eval/clip_score")] is None
    assert any(m.startswith("media/images/plots/heatmap_clip_score") for m in run["media"])
    assert run["summary"]["best/trial"] == 0  # trial 1 scores higher but violates a constraint
    assert run["summary"]["num_trials"] == 3


# ---- live runs: records reach the .wandb file while the trial still trains ---------------------------
class Slot:
    def __init__(self, number: int, step: int, lr: float):
        self.number, self.step, self.params = (
            number,
            step,
            {"method.learning_rate": lr, "train.max_train_steps": step},
        )


def poll_history(run_dir, key: str, count: int, timeout: float = 30.0) -> dict:
    """Read every run file under run_dir until each has ``count`` points of ``key`` (or time out)."""
    import time

    deadline = time.monotonic() + timeout
    while True:
        files = sorted(run_dir.rglob("run-*.wandb"))
        runs = [wandb_records.read_run(f) for f in files]
        if runs and all(len(wandb_records.history_of(r, key)) >= count for r in runs):
            return {r["run"]["name"]: r for r in runs}
        if time.monotonic() > deadline:
            got = {r["run"].get("name"): len(wandb_records.history_of(r, key)) for r in runs}
            raise AssertionError(f"no live {key} records after {timeout}s: {got}")
        time.sleep(0.3)


def read_finished(run_dir, count: int, timeout: float = 30.0) -> dict:
    """The runs once all ``count`` have their exit record (wandb-core closes the file just after finish())."""
    import time

    deadline = time.monotonic() + timeout
    while True:
        runs = [wandb_records.read_run(f) for f in sorted(run_dir.rglob("run-*.wandb"))]
        if len(runs) == count and all(r["exit_code"] is not None for r in runs):
            return {r["run"]["name"]: r for r in runs}
        assert time.monotonic() < deadline, f"runs not finished on disk after {timeout}s"
        time.sleep(0.2)


def test_live_runs_stream_while_training_and_share_milestones(wandb_cfg, tmp_path):
    wandb_cfg.tracking.flush_seconds = 0.2
    run_dir = tmp_path / "wb"
    # One milestone-sharing training run serving two trials: 2 steps and 4 steps.
    live = tracking.LiveTrialRuns(wandb_cfg, "live-study", [Slot(5, 2, 1e-4), Slot(6, 4, 1e-4)], run_dir)
    for step in (1, 2):
        live.log_step(step, {"train/loss": 1.0 / step, "train/lr": 1e-4})
    # Both runs are still open: their training curve is already on disk.
    runs = poll_history(run_dir, "train/loss", 1)
    assert set(runs) == {"t005 lr=1e-04 steps=2", "t006 lr=1e-04 steps=4"}
    assert all(r["exit_code"] is None for r in runs.values())  # not finished
    live.log_eval(2, {"eval/clip_score": 21.0, "eval/fid": float("nan")}, Image.new("RGB", (8, 8), "red"))
    assert live.finish(5, {"state": "COMPLETE", "metrics": {"eval/clip_score": 21.0}})
    for step in (3, 4):
        live.log_step(step, {"train/loss": 1.0 / step, "train/lr": 1e-4})
    live.log_eval(4, {"eval/clip_score": 23.0}, None)
    runs = poll_history(run_dir, "train/loss", 2)
    assert runs["t006 lr=1e-04 steps=4"]["exit_code"] is None  # trial 6 is still training
    run_id = live.finish(6, {"state": "COMPLETE", "metrics": {"eval/clip_score": 23.0}})
    by_name = read_finished(run_dir, 2)
    short, long = by_name["t005 lr=1e-04 steps=2"], by_name["t006 lr=1e-04 steps=4"]
    assert long["id"] == run_id
    # Each trial's run holds the shared curve up to its own step count and its own evaluations.
    assert wandb_records.history_of(short, "train/loss") == [(1, 1.0), (2, 0.5)]
    assert [s for s, _ in wandb_records.history_of(long, "train/loss")] == [1, 2, 3, 4]
    assert wandb_records.history_of(long, "eval/clip_score") == [(2, 21.0), (4, 23.0)]
    assert [s for s, _ in wandb_records.history_of(short, "eval/grid")] == [2]
    assert short["summary"]["eval/clip_score"] == 21.0 and short["exit_code"] == 0
    # W&B grouping (#18): group = study, job type = method, model and method as tags and config.
    assert long["run"]["group"] == "live-study" and long["run"]["job_type"] == "full"
    assert long["run"]["tags"][:2] == ["tiny", "full"]
    assert long["config"]["model.name"] == "tiny" and long["config"]["method.name"] == "full"
    assert long["config"]["train.max_train_steps"] == 4 and isinstance(
        long["config"]["train.max_train_steps"], int
    )


def test_live_runs_off_when_tracking_is_off(tiny_cfg, tmp_path):
    live = tracking.LiveTrialRuns(tiny_cfg, "s", [Slot(0, 2, 1e-4)], tmp_path / "wb")
    live.log_step(1, {"train/loss": 1.0})
    assert live.finish(0, {"state": "COMPLETE"}) is None
    assert not (tmp_path / "wb").exists()


def test_study_run_has_study_level_config_and_clean_table(wandb_cfg, tmp_path):
    wandb_cfg.sweep = compose(TINY_OVERRIDES + ["+sweep=lr_steps"]).sweep
    results = pd.DataFrame(
        [
            {"trial": None, "state": "BASELINE", "method.learning_rate": None, "train.max_train_steps": 0},
            {
                "trial": 0,
                "state": "COMPLETE",
                "method.learning_rate": 1e-4,
                "train.max_train_steps": 10.0,
                "eval/clip_score": 21.0,
            },
        ]
    )
    tracking.record_study(wandb_cfg, "my-study", results, {}, tmp_path / "wb")
    [folder] = wandb_records.run_dirs(tmp_path / "wb")
    run = wandb_records.read_finished_run(folder)
    config = run["config"]
    # No per-trial hyperparameters: the study run is no fake point on parallel coordinates.
    assert not [k for k in config if k.startswith(("train.", "method.learning_rate"))]
    assert config["study"] == "my-study" and config["model.name"] == "tiny"
    assert config["sweep.swept"] == sorted(wandb_cfg.sweep.params)
    table = wandb_records.read_table(folder, run, "trials")
    assert [c for c in table["columns"] if "learning_rate" in c or "max_train_steps" in c] == [
        "method.learning_rate",
        "train.max_train_steps",
    ]
    row = table["data"][1]
    steps = row[table["columns"].index("train.max_train_steps")]
    assert steps == 10 and isinstance(steps, int)
    assert row[table["columns"].index("trial")] == 0 and isinstance(row[table["columns"].index("trial")], int)


# ---- progress lines (sdsweep/progress.py) and the torchvision advice filter ---------------------------
def test_progress_prints_plain_lines_with_rate_and_eta_when_not_a_tty(monkeypatch):
    import io as _io
    import logging

    from sdsweep.progress import Progress, format_seconds
    from sdsweep.warnings_filter import TORCHVISION_LOGGER, install

    monkeypatch.delenv("SDSWEEP_PROGRESS", raising=False)
    stream = _io.StringIO()  # not a TTY: no carriage-return bar
    bar = Progress("train t1", 100, "steps", stream=stream, plain_every=0.0, time_from_first_update=True)
    bar.update(10, loss=0.5)
    bar.update(40, loss=0.25)
    bar.close()
    lines = stream.getvalue().splitlines()
    assert "\r" not in stream.getvalue() and len(lines) == 3
    assert lines[1].startswith("train t1: 40/100 steps (40%)") and "steps/s ETA" in lines[1]
    assert lines[1].endswith("loss=0.25")
    assert format_seconds(3725) == "1h02m" and format_seconds(65) == "1m05s" and format_seconds(None) == "?"

    install()
    install()  # idempotent
    seen = []
    handler = logging.Handler()
    handler.emit = seen.append
    logger = logging.getLogger(TORCHVISION_LOGGER)
    logger.addHandler(handler)
    try:
        logger.warning("`CLIPImageProcessor` requires torchvision (not installed); falling back to `X`")
        logger.warning("another transformers warning")
    finally:
        logger.removeHandler(handler)
    assert [r.getMessage() for r in seen] == ["another transformers warning"]
