"""A run's config is built once, when the run is claimed, and travels inside its RunSpec as resolved YAML:
the executor, the baseline and the ranks read it back and never compose with Hydra (issue #26)."""

from __future__ import annotations

import optuna
import pytest
from conftest import TINY_OVERRIDES

from sdsweep.config import compose as compose_module
from sdsweep.config.load import to_yaml
from sdsweep.sweep.engine import SweepEngine
from sdsweep.sweep.run_config import build_config
from sdsweep.sweep.run_executor import execute_run
from sdsweep.sweep.run_spec import RunSpec, TrialSlot

FAST = [
    "eval.metrics=[clip_score,appropriate_rate,val_loss]",
    "eval.prompts=[a photo of sks]",
    "tracking=none",
]


def sweep_overrides(root, study: str, *extra: str) -> list[str]:
    common = ["+sweep=lr_steps", "sweep.isolation=inprocess", "sweep.keep_best_k=-1"]
    return TINY_OVERRIDES + FAST + common + [f"paths.root={root}", f"study={study}", *extra]


def test_a_run_spec_round_trips_through_json_with_its_config(tmp_path):
    overrides = sweep_overrides(tmp_path, "json", "method=textual_inversion", "sweep.learning_rates=[1e-3]")
    cfg = build_config(overrides)
    spec = RunSpec(
        study=cfg.study,
        study_root=str(tmp_path / "json"),
        storage="sqlite:///x.db",
        overrides=overrides,
        config=to_yaml(cfg),
        run_key="k",
        slots=[TrialSlot(number=0, trial_id=1, step=4, params={"method.learning_rate": 1e-3})],
    )
    again = RunSpec.from_json(spec.to_json())
    assert again == spec
    # The typed config comes back equal, fix-ups included (textual inversion's prompts name its token).
    assert again.typed_config() == cfg
    assert cfg.method.placeholder_token in " ".join(again.typed_config().eval.prompts)


def refuse_hydra(monkeypatch: pytest.MonkeyPatch) -> None:
    def composed(*args, **kwargs):
        raise AssertionError("a run's process composed its config with Hydra")

    monkeypatch.setattr(compose_module, "compose_raw", composed)
    monkeypatch.setattr("hydra.compose", composed)


def test_a_claimed_run_and_its_baseline_train_from_the_spec_without_hydra(tmp_path, monkeypatch):
    overrides = sweep_overrides(tmp_path, "once", "sweep.learning_rates=[1e-3]", "sweep.steps=[2]")
    engine = SweepEngine(overrides)
    claimed = engine.next_run()  # claims the run and builds its config: the one composition
    assert claimed is not None and claimed.config
    spec = RunSpec.from_json(claimed.to_json())  # as a pool worker receives it
    refuse_hydra(monkeypatch)
    engine.ensure_baseline()  # no model is swept: the sweep's own config, no composition
    execute_run(spec, engine.caches)
    assert (engine.paths.baseline / "metrics.json").exists()
    study = optuna.load_study(study_name="once", storage=engine.storage)
    [trial] = study.trials
    assert trial.state == optuna.trial.TrialState.COMPLETE
    assert (engine.paths.trial(trial.number) / "weights").is_dir()


def test_an_invalid_point_fails_its_trials_at_claim_time(tmp_path):
    """A point whose values make no valid config fails for good when claimed, with the config error's fate."""
    from sdsweep.study.trial_tags import Fate, TrialTags

    overrides = sweep_overrides(tmp_path, "bad", "sweep.learning_rates=[1e-3]", "sweep.steps=[2]")
    engine = SweepEngine(overrides)
    engine.overrides = engine.overrides + ["train.train_batch_size=0"]  # every run's build fails now
    claim = engine.claimer.next_claim()
    assert isinstance(claim, tuple)
    assert engine.spec_for(*claim) == "again"
    [trial] = engine.handle.trials()
    assert trial.state == optuna.trial.TrialState.FAIL
    assert TrialTags.of(trial).fate == Fate.CONFIG_ERROR
