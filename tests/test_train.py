"""The training loop with the real full and LoRA methods on the tiny model."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch
from conftest import TINY_OVERRIDES, compose

from sdsweep.data.examples import load_examples, split_examples
from sdsweep.data.latent_cache import build_training_dataset
from sdsweep.errors import ConfigError
from sdsweep.models.loading import load_components
from sdsweep.training.checkpoints import latest_checkpoint
from sdsweep.training.methods import get_method
from sdsweep.training.optimizers import make_optimizer
from sdsweep.training.train import TrainHooks, TrainingDiverged, train

CPU = torch.device("cpu")


class Recorder:
    """Hooks that remember what the loop reported; ``stop_at`` makes on_milestone ask to stop."""

    def __init__(self, stop_at: int | None = None):
        self.steps: list[tuple[int, dict[str, float]]] = []
        self.milestones: list[int] = []
        self.stop_at = stop_at

    def hooks(self) -> TrainHooks:
        return TrainHooks(
            on_step=lambda step, logs: self.steps.append((step, logs)), on_milestone=self.milestone
        )

    def milestone(self, step: int) -> bool:
        self.milestones.append(step)
        return step == self.stop_at


def setup(cache_dir: Path, method_name: str = "full", *extra: str):
    """A freshly loaded model and prepared method, as a new trial process would build them."""
    # Batch 1 keeps each step cheap; the behaviour under test does not depend on the batch size.
    cfg = compose(
        TINY_OVERRIDES
        + [f"method={method_name}", "method.learning_rate=1e-3", "train.train_batch_size=1", *extra]
    )
    components = load_components(cfg, CPU)
    torch.manual_seed(0)  # LoRA's adapter initialisation draws from the global RNG
    method = get_method(method_name)(cfg, components, CPU, cache_dir)
    method.prepare()
    examples, _ = split_examples(load_examples(cfg), cfg.data.num_heldout)
    return cfg, method, build_training_dataset(cfg, components, method, examples, cache_dir)


def trainable_copy(method) -> list[torch.Tensor]:
    return [p.detach().clone() for p in method.trainable_parameters()]


@pytest.mark.parametrize("method_name", ["full", "lora"])
def test_resumed_run_matches_an_uninterrupted_one(tmp_path, method_name):
    cfg, method, dataset = setup(tmp_path / "cache", method_name)
    before = trainable_copy(method)
    straight = Recorder()
    result = train(cfg, method, dataset, [2, 4], straight.hooks(), tmp_path / "straight")
    assert (result.final_step, result.stopped_early, result.stop_reason) == (4, False, None)
    assert straight.milestones == [2, 4] and [s for s, _ in straight.steps] == [1, 2, 3, 4]
    expected = trainable_copy(method)
    assert any(not torch.equal(a, b) for a, b in zip(before, expected))  # it did train

    cfg, method, dataset = setup(tmp_path / "cache", method_name)
    first = Recorder()
    assert train(cfg, method, dataset, [2], first.hooks(), tmp_path / "resumed").final_step == 2
    cfg, method, dataset = setup(tmp_path / "cache", method_name)  # a new process: fresh weights
    second = Recorder()
    result = train(cfg, method, dataset, [4], second.hooks(), tmp_path / "resumed")
    assert result.final_step == 4 and len(result.step_seconds) == 2
    assert first.milestones == [2] and second.milestones == [4] and [s for s, _ in second.steps] == [3, 4]
    for resumed, uninterrupted in zip(trainable_copy(method), expected):
        assert torch.equal(resumed, uninterrupted)
    losses = [logs["train/loss"] for _, logs in first.steps + second.steps]
    assert losses == [logs["train/loss"] for _, logs in straight.steps]
    # Only the newest checkpoint is kept.
    assert [p.name for p in (tmp_path / "resumed").iterdir()] == ["step-4"]
    assert (
        latest_checkpoint(tmp_path / "resumed", at_most=3) is None
    )  # newer than a first milestone: not used

    # Killed during the step-4 evaluation: the next call re-runs that milestone's callback, no training.
    cfg, method, dataset = setup(tmp_path / "cache", method_name)
    rerun = Recorder(stop_at=4)  # e.g. the evaluation now prunes the trial
    result = train(cfg, method, dataset, [4, 6], rerun.hooks(), tmp_path / "resumed")
    assert rerun.milestones == [4] and rerun.steps == [] and result.step_seconds == []
    assert result.final_step == 4 and result.stopped_early and "step 4" in result.stop_reason
    for restored, uninterrupted in zip(trainable_copy(method), expected):
        assert torch.equal(restored, uninterrupted)


def test_a_differently_configured_checkpoint_is_refused_before_loading(tmp_path):
    cfg, method, dataset = setup(tmp_path / "cache", "lora")
    train(cfg, method, dataset, [1], checkpoint_dir=tmp_path / "run")
    cfg, method, dataset = setup(tmp_path / "cache", "lora", "train.adam_weight_decay=0.5")
    before = trainable_copy(method)
    with pytest.raises(
        ValueError, match=r"configured differently \(train.adam_weight_decay: 0.01 -> 0.5\).*Delete"
    ):
        train(cfg, method, dataset, [2], checkpoint_dir=tmp_path / "run")
    assert all(torch.equal(a, b) for a, b in zip(before, trainable_copy(method)))


def test_hooks_see_every_step_and_can_stop_training(tmp_path):
    cfg, method, dataset = setup(
        tmp_path / "cache", "lora", "train.lr_scheduler=linear", "train.max_train_steps=4"
    )
    recorder = Recorder(stop_at=2)
    result = train(cfg, method, dataset, [2, 4], recorder.hooks())
    assert result.final_step == 2 and result.stopped_early and result.steps_per_second > 0
    assert recorder.milestones == [2]
    assert [step for step, _ in recorder.steps] == [1, 2]
    for _, logs in recorder.steps:
        assert isinstance(logs["train/loss"], float) and logs["train/loss"] > 0
    # Linear decay over max_train_steps=4, one scheduler step per optimizer step.
    assert [logs["train/lr"] for _, logs in recorder.steps] == pytest.approx([0.75e-3, 0.5e-3])


def test_gradient_accumulation_steps_the_schedule_once_per_optimizer_step(tmp_path):
    cfg, method, dataset = setup(
        tmp_path / "cache",
        "lora",
        "train.gradient_accumulation_steps=2",
        "train.train_batch_size=1",
        "train.lr_scheduler=linear",
        "train.max_train_steps=2",
    )
    recorder = Recorder()
    result = train(cfg, method, dataset, [2], recorder.hooks())
    assert result.final_step == 2 and [s for s, _ in recorder.steps] == [1, 2]
    assert [logs["train/lr"] for _, logs in recorder.steps] == pytest.approx([0.5e-3, 0.0])


def test_exploding_loss_raises_training_diverged(tmp_path):
    # A factor below 1 makes any later loss an "explosion": the check itself is what is tested.
    cfg, method, dataset = setup(tmp_path / "cache", "lora", "train.loss_explosion_factor=0.001")
    with pytest.raises(TrainingDiverged, match=r"exploded to .* at step 2,.*learning rate 0.001"):
        train(cfg, method, dataset, [3])


def test_bad_milestones_fail_before_training(tmp_path):
    cfg, method, dataset = setup(
        tmp_path / "cache", "lora", "train.lr_scheduler=cosine", "train.max_train_steps=2"
    )
    with pytest.raises(ValueError, match="max_train_steps=2.*step 3"):
        train(cfg, method, dataset, [3])
    with pytest.raises(ValueError, match="at least 1 step"):
        train(cfg, method, dataset, [0, 2])


def test_8bit_adam_is_a_config_error_without_bitsandbytes_or_cuda():
    """It used to fall back to AdamW with a warning; a sweep would then compare the wrong optimizer."""
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        # The legacy spelling is translated once, with a deprecation note, into the optimizer it names.
        with pytest.warns(FutureWarning, match="use_8bit_adam is deprecated.*train.optimizer=adamw8bit"):
            with pytest.raises(
                ConfigError, match="train.optimizer=adamw8bit.*'bitsandbytes' is not installed"
            ):
                compose(TINY_OVERRIDES + ["method.use_8bit_adam=true"])
        return
    cfg = compose(TINY_OVERRIDES + ["method.use_8bit_adam=true"])
    with pytest.raises(ConfigError, match="CUDA only"):
        make_optimizer(cfg, [torch.nn.Parameter(torch.zeros(3))], CPU)


def test_adamw_keeps_its_settings_and_textual_inversion_never_decays():
    cfg = compose(TINY_OVERRIDES)
    optimizer = make_optimizer(cfg, [torch.nn.Parameter(torch.zeros(3))], CPU)
    assert type(optimizer) is torch.optim.AdamW
    assert optimizer.defaults["weight_decay"] == cfg.train.adam_weight_decay
    cfg = compose(TINY_OVERRIDES + ["method=textual_inversion"])
    assert make_optimizer(cfg, [torch.nn.Parameter(torch.zeros(3))], CPU).defaults["weight_decay"] == 0.0


def test_the_loop_never_imports_tracking_or_search_libraries():
    source = Path(__file__).resolve().parents[1] / "sdsweep" / "training" / "train.py"
    imported = set()
    for node in ast.walk(ast.parse(source.read_text())):
        if isinstance(node, ast.Import):
            imported |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module.split(".")[0])
    assert "torch" in imported and not imported & {"wandb", "optuna"}
