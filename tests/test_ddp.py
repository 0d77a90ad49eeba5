"""train.num_processes: one run trained by several data-parallel ranks (gloo on CPU, nccl on GPUs)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import psutil
import pytest
import torch
from conftest import TINY_OVERRIDES, compose

from sdsweep.errors import ConfigError
from sdsweep.sweep.driver import run_sweep
from sdsweep.sweep.pool import worker_devices
from sdsweep.training.batches import SeededInfiniteSampler, noise_seeds
from sdsweep.training.distributed import check_devices

STEPS = 3
# One run, scored by the cheapest metric: the test is about training, not evaluation.
RUN = [
    "method=full",
    "method.learning_rate=1e-3",
    f"train.max_train_steps={STEPS}",
    "train.seed=7",
    "train.noise_offset=0.05",  # per-sample seeded too: part of what must match
    "eval.metrics=[clip_score,val_loss]",
    "eval.prompts=[a photo of sks]",
    "eval.baseline=false",
]


def single_run(root: Path, study: str, *extra: str):
    outcome = run_sweep(TINY_OVERRIDES + RUN + [f"paths.root={root}", f"study={study}", *extra])
    (trial_dir,) = sorted((outcome.study_dir / "trials").iterdir())
    record = json.loads((trial_dir / "metrics.json").read_text())
    return outcome, trial_dir, record


def rank_processes() -> list[psutil.Process]:
    found = []
    for proc in psutil.Process(os.getpid()).children(recursive=True):
        try:
            if "sdsweep.sweep.rank" in " ".join(proc.cmdline()):
                found.append(proc)
        except psutil.NoSuchProcess:
            pass
    return found


def unet_weights(folder: Path) -> dict[str, torch.Tensor]:
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None)
    return {k: v.detach().clone() for k, v in pipe.unet.state_dict().items()}


@pytest.mark.slow
def test_two_ranks_train_like_one_process_with_the_doubled_batch(tmp_path, tiny_model_dirs):
    _, one_dir, one = single_run(tmp_path, "one", "train.train_batch_size=2", "train.num_processes=1")
    _, two_dir, two = single_run(tmp_path, "two", "train.train_batch_size=1", "train.num_processes=2")
    assert one["state"] == two["state"] == "COMPLETE", (one["fail_reason"], two["fail_reason"])
    one_losses = [h["train/loss"] for h in one["history"]]
    two_losses = [h["train/loss"] for h in two["history"]]
    assert len(one_losses) == len(two_losses) == STEPS
    # Same samples, same per-sample noise: only the summation order of the mean differs (fp32).
    assert two_losses == pytest.approx(one_losses, rel=1e-5, abs=1e-6)
    # The saved weights load through diffusers and match after the optimizer steps.
    one_unet, two_unet = unet_weights(one_dir / "weights"), unet_weights(two_dir / "weights")
    assert one_unet.keys() == two_unet.keys()
    # Tolerance: the two weight updates (trained - initial) agree to 1 % in norm. Adam divides by
    # sqrt(v), so an element whose gradient is ~0 can move by up to lr on a rounding difference
    # (measured: 0.14 % in norm, median element 3e-8, max 6.6e-4 at lr 1e-3); unsynchronised
    # gradients or different samples would differ by tens of percent.
    initial = unet_weights(Path(tiny_model_dirs["sd15"]))
    gap = sum(float((one_unet[k] - two_unet[k]).norm() ** 2) for k in one_unet) ** 0.5
    update = sum(float((one_unet[k] - initial[k]).norm() ** 2) for k in one_unet) ** 0.5
    assert update > 0 and gap / update < 0.01, (gap, update)
    median = torch.cat([(one_unet[k] - two_unet[k]).abs().flatten() for k in one_unet]).median()
    assert float(median) < 1e-6
    # Rank 0 alone wrote the trial: one metrics.json, the other rank only left its log.
    assert list(two_dir.parent.parent.rglob("metrics.json")) == [two_dir / "metrics.json"]
    assert len(list((two_dir.parent.parent / "runs").glob("*-rank1.log"))) == 1
    assert rank_processes() == []


def test_bad_rank_counts_are_config_errors_before_any_model_loads():
    with pytest.raises(ConfigError, match="train.num_processes"):
        compose(TINY_OVERRIDES + ["train.num_processes=0"])
    cfg = compose(TINY_OVERRIDES + ["train.num_processes=2", "+sweep=lr_steps", "sweep.workers=2"])
    visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if visible < 4:
        with pytest.raises(ConfigError, match=r"needs 4 GPUs \(one per rank\)"):
            check_devices(cfg, torch.device("cuda"))
    check_devices(cfg, torch.device("cpu"))  # on CPU the ranks share the cores: allowed


def test_the_pool_gives_each_worker_its_ranks_devices(monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert worker_devices(2, [0, 1, 2, 3], per_worker=2) == ["0,1", "2,3"]
    assert worker_devices("auto", [0, 1, 2, 3], per_worker=2) == ["0,1", "2,3"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5,6,7")  # indices count within the visible devices
    assert worker_devices(1, [2, 3], per_worker=2) == ["6,7"]
    assert worker_devices(1, [0], per_worker=1) == ["4"]


@pytest.mark.slow
def test_a_crashed_rank_fails_the_trial_with_its_reason(tmp_path, monkeypatch):
    monkeypatch.setenv("SDSWEEP_FAULT", "rank_crash")  # read by sdsweep.sweep.rank only
    outcome, _, record = single_run(tmp_path, "crash", "train.train_batch_size=1", "train.num_processes=2")
    assert outcome.states == {"FAIL": 1}
    assert record["fail_reason"].startswith("RankFailed: rank 1 of 2 failed: RuntimeError: injected fault")
    assert rank_processes() == []


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs 2 CUDA devices (nccl)"
)
def test_two_ranks_on_two_gpus(tmp_path):
    """The same functions on nccl: one GPU per rank, rank 0 evaluates and records."""
    outcome, trial_dir, record = single_run(
        tmp_path, "gpus", "device=cuda", "train.train_batch_size=1", "train.num_processes=2"
    )
    assert outcome.states == {"COMPLETE": 1}, record["fail_reason"]
    assert len(record["history"]) == STEPS and all(h["train/loss"] > 0 for h in record["history"])
    assert unet_weights(trial_dir / "weights")
    assert rank_processes() == []


def test_ranks_split_each_global_batch_and_its_noise_seeds_like_one_process():
    def take(sampler, n):
        stream = iter(sampler)
        return [next(stream) for _ in range(n)]

    # Batch 2 per rank x 2 ranks x 3 steps, resumed after 4 global draws: the ranks' chunks interleave
    # into exactly the single stream of batch 4.
    single = take(SeededInfiniteSampler(5, seed=3, start=4, draw_keys=True), 12)
    ranks = [take(SeededInfiniteSampler(5, 3, 4, True, rank=r, world_size=2, chunk=2), 6) for r in (0, 1)]
    interleaved = [key for step in range(3) for r in (0, 1) for key in ranks[r][2 * step : 2 * step + 2]]
    assert interleaved == single
    # The noise seeds of step 5: rank r's batch starts at global index r x batch.
    assert noise_seeds(7, 5, 0, 2) + noise_seeds(7, 5, 2, 2) == noise_seeds(7, 5, 0, 4)
    assert len(set(noise_seeds(7, 5, 0, 4) + noise_seeds(7, 6, 0, 4))) == 8
