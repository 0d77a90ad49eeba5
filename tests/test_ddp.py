"""train.num_processes: one run trained by several data-parallel ranks (gloo on CPU, nccl on GPUs).

The equivalence tests run real ranks (a child process joined over real gloo) on the tiny model and
compare each method with a single process training the same global batch: the loss trajectories and
the saved weights, loaded back through diffusers' own loaders.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from conftest import REPO, TINY_OVERRIDES, compose

from sdsweep.errors import ConfigError
from sdsweep.sweep.driver import run_sweep
from sdsweep.sweep.pool import worker_devices
from sdsweep.training.batches import noise_seeds, training_loader
from sdsweep.training.distributed import check_devices

STEPS = 3
# One run, scored by the cheapest metric: the tests are about training, not evaluation.
RUN = [
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
            if "sdsweep.training.rank" in " ".join(proc.cmdline()):
                found.append(proc)
        except psutil.NoSuchProcess:
            pass
    return found


# ---- what "the same weights" means per method: the trained tensors, loaded the way users load them ------
def trained_tensors(method: str, weights_dir: Path, overrides: list[str]) -> dict[str, torch.Tensor]:
    """full: the UNet's weights; LoRA: each adapted layer's weight change B @ A (zero before training);
    textual inversion: the learned embedding row."""
    from sdsweep.training.methods import load_trained_pipeline

    cfg = compose(TINY_OVERRIDES + overrides)
    pipe = load_trained_pipeline(cfg, weights_dir, torch.device("cpu"))
    if method == "full":
        return {k: v.detach().clone() for k, v in pipe.unet.state_dict().items()}
    if method == "lora":
        state = pipe.unet.state_dict()
        deltas = {}
        for key in (k for k in state if ".lora_A." in k):
            deltas[key] = state[key.replace(".lora_A.", ".lora_B.")].float() @ state[key].float()
        assert deltas, "no LoRA layers were loaded"
        return deltas
    token_id = pipe.tokenizer.convert_tokens_to_ids(cfg.method.placeholder_token)
    return {"embedding": pipe.text_encoder.get_input_embeddings().weight[token_id].detach().clone()}


def initial_tensors(
    method: str, trained: dict[str, torch.Tensor], model_dir: Path
) -> dict[str, torch.Tensor]:
    from sdsweep.models.loading import load_pipeline

    if method == "lora":
        return {k: torch.zeros_like(v) for k, v in trained.items()}  # lora_B starts at zero
    base = load_pipeline(str(model_dir), "pndm", torch.device("cpu"))
    if method == "full":
        return {k: v.detach().clone() for k, v in base.unet.state_dict().items()}
    (initializer,) = base.tokenizer.encode("person", add_special_tokens=False)  # conf: initializer_token
    return {"embedding": base.text_encoder.get_input_embeddings().weight[initializer].detach().clone()}


def norm(tensors) -> float:
    return sum(float(t.float().norm() ** 2) for t in tensors) ** 0.5


# method, its options, (rank batch, accumulation) on 2 ranks, the single process's batch (the same global batch)
CASES = {
    "full": ("full", ["method=full", "method.learning_rate=1e-3"], (1, 1), 2),
    "lora": ("lora", ["method=lora", "method.learning_rate=3e-3"], (1, 1), 2),
    # template=object: each draw's prompt template is drawn from the draw's own seed, on whichever rank
    "textual_inversion": (
        "textual_inversion",
        ["method=textual_inversion", "method.learning_rate=5e-3", "method.template=object"],
        (1, 1),
        2,
    ),
    # aspect-ratio buckets: a global batch comes from one bucket and is split between the ranks
    "bucketing": ("full", ["method=full", "method.learning_rate=1e-3", "train.bucketing=true"], (1, 1), 2),
    # 2 ranks x batch 1 x 2 micro-steps (the first under DDP's no_sync) against one process with batch 4
    "accumulation": ("full", ["method=full", "method.learning_rate=1e-3"], (1, 2), 4),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_two_ranks_train_like_one_process_with_the_doubled_batch(case, tmp_path, tiny_model_dirs):
    method, options, (rank_batch, accumulation), single_batch = CASES[case]
    _, one_dir, one = single_run(
        tmp_path, "one", *options, f"train.train_batch_size={single_batch}", "train.num_processes=1"
    )
    _, two_dir, two = single_run(
        tmp_path,
        "two",
        *options,
        f"train.train_batch_size={rank_batch}",
        f"train.gradient_accumulation_steps={accumulation}",
        "train.num_processes=2",
    )
    assert one["state"] == two["state"] == "COMPLETE", (one["fail_reason"], two["fail_reason"])
    one_losses = [h["train/loss"] for h in one["history"]]
    two_losses = [h["train/loss"] for h in two["history"]]
    assert len(one_losses) == len(two_losses) == STEPS
    # Same samples, same per-sample noise: only the summation order of the mean differs (fp32).
    worst = max(abs(a - b) / abs(a) for a, b in zip(one_losses, two_losses))
    assert two_losses == pytest.approx(one_losses, rel=1e-5, abs=1e-6), worst

    # The saved weights load through diffusers' loaders and match after the optimizer steps.
    one_w = trained_tensors(method, one_dir / "weights", options)
    two_w = trained_tensors(method, two_dir / "weights", options)
    initial = initial_tensors(method, one_w, Path(tiny_model_dirs["sd15"]))
    assert one_w.keys() == two_w.keys()
    # Tolerance: the two weight updates (trained - initial) agree to 1 % in norm. Adam divides by
    # sqrt(v), so an element whose gradient is ~0 can move by up to lr on a rounding difference
    # (full, lr 1e-3: 0.14 % in norm, median element 3e-8); unsynchronised gradients, different
    # samples or different prompt templates differ by tens of percent.
    gap = norm(one_w[k] - two_w[k] for k in one_w)
    update = norm(one_w[k] - initial[k] for k in one_w)
    print(f"\n[{case}] worst loss rel diff {worst:.2e}; weight update gap {gap / update:.3%} of {update:.3g}")
    assert update > 0 and gap / update < 0.01, (gap, update)

    # Rank 0 alone wrote the trial: one metrics.json, the other rank only left its log.
    study = two_dir.parent.parent
    assert list(study.rglob("metrics.json")) == [two_dir / "metrics.json"]
    assert len(list((study / "runs").glob("*-rank1.log"))) == 1
    assert rank_processes() == []


@pytest.mark.slow
def test_dreambooth_class_images_are_generated_by_one_rank(tmp_path, capfd):
    """Both ranks need the class images at start-up; one generates them into the study cache while the
    other waits on the lock, then both read the same files."""
    _, trial_dir, record = single_run(
        tmp_path,
        "db",
        "method=dreambooth",
        "method.num_class_images=3",
        # Sampling slow enough (seconds) that both ranks want the images while they are being generated.
        "eval.num_inference_steps=60",
        "train.train_batch_size=1",
        "train.num_processes=2",
    )
    assert record["state"] == "COMPLETE", record["fail_reason"]
    study = trial_dir.parent.parent
    (folder,) = [p for p in (study / "cache" / "class_images").iterdir() if p.is_dir()]
    assert sorted(p.name for p in folder.iterdir()) == ["00000.png", "00001.png", "00002.png"]
    (rank1_log,) = (study / "runs").glob("*-rank1.log")
    said = capfd.readouterr().out + rank1_log.read_text()
    assert said.count("generating 3 class images") == 1, said
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
    monkeypatch.setenv("SDSWEEP_FAULT", "rank_crash")  # read by sdsweep.training.rank only
    outcome, _, record = single_run(
        tmp_path, "crash", "method=full", "train.train_batch_size=1", "train.num_processes=2"
    )
    assert outcome.states == {"FAIL": 1}
    assert record["fail_reason"].startswith("RankFailed: rank 1 of 2 failed: RuntimeError: injected fault")
    assert rank_processes() == []


@pytest.mark.slow
def test_the_other_ranks_die_with_rank_0(tmp_path):
    """rank 0 killed outright (SIGKILL: no handler of its runs): its child rank goes too, within seconds."""
    overrides = TINY_OVERRIDES + RUN[1:] + ["train.max_train_steps=100000", "train.train_batch_size=1"]
    command = [sys.executable, "-m", "sdsweep", *overrides, f"paths.root={tmp_path}", "study=killed"]
    log = tmp_path / "driver.log"
    with open(log, "w") as out:
        driver = psutil.Popen(
            [*command, "train.num_processes=2"], cwd=REPO, stdout=out, stderr=subprocess.STDOUT
        )
    try:
        deadline, ranks = time.monotonic() + 180, []
        while time.monotonic() < deadline and driver.poll() is None:
            time.sleep(0.5)
            ranks = [
                p for p in driver.children(recursive=True) if "sdsweep.training.rank" in " ".join(p.cmdline())
            ]
            if ranks and "predicted peak memory" in log.read_text():  # rank 0 joined and is loading
                break
        assert ranks, f"no rank child appeared (driver exit code {driver.poll()}): {log.read_text()[-2000:]}"
        time.sleep(5)  # both ranks in the training loop by now
        (rank1,) = ranks
        assert rank1.is_running() and driver.poll() is None, log.read_text()[-2000:]
        rank1.parent().send_signal(signal.SIGKILL)  # rank 0: the driver itself or its worker process
        _, alive = psutil.wait_procs([rank1], timeout=20)
        assert not alive, f"rank 1 (pid {rank1.pid}) outlived rank 0"
    finally:
        leftovers = [driver]
        with contextlib.suppress(psutil.NoSuchProcess):
            leftovers += driver.children(recursive=True)
        for proc in leftovers:
            with contextlib.suppress(psutil.NoSuchProcess):
                proc.kill()
        driver.wait()


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs 2 CUDA devices (nccl)"
)
def test_two_ranks_on_two_gpus(tmp_path):
    """The same functions on nccl: one GPU per rank, rank 0 evaluates and records."""
    outcome, trial_dir, record = single_run(
        tmp_path, "gpus", "method=full", "device=cuda", "train.train_batch_size=1", "train.num_processes=2"
    )
    assert outcome.states == {"COMPLETE": 1}, record["fail_reason"]
    assert len(record["history"]) == STEPS and all(h["train/loss"] > 0 for h in record["history"])
    assert trained_tensors("full", trial_dir / "weights", ["method=full"])
    assert rank_processes() == []


def test_prepared_modules_keep_their_own_precision_outside_the_training_autocast():
    """accelerate wraps a prepared module's forward in autocast, in place, under mixed precision;
    train() takes that off (the loop autocasts the training forward itself), so what rank 0 evaluates
    and saves runs in its own precision."""
    from accelerate import Accelerator

    from sdsweep.training.methods.base import TrainedModules
    from sdsweep.training.process_group import reset_accelerate
    from sdsweep.training.train import _prepare_trained

    class Method:
        name = "stub"

        def __init__(self, module):
            self.module = module

        def trained_modules(self):
            return TrainedModules(unet=self.module)

    module, inputs = torch.nn.Linear(8, 8), torch.randn(2, 8)
    reset_accelerate()
    try:
        accelerator = Accelerator(mixed_precision="bf16", cpu=True)
        prepared = _prepare_trained(accelerator, Method(module))
        assert prepared.unet is module and "forward" not in vars(module)  # one rank: the module itself
        exact = torch.nn.functional.linear(inputs, module.weight, module.bias)
        assert torch.equal(module(inputs), exact)  # fp32, not bf16 cast back
        with accelerator.autocast():
            assert module(inputs).dtype == torch.bfloat16
    finally:
        reset_accelerate()


# ---- the data: accelerate's split of each global batch, against the single process's stream ---------------
class Keys(torch.utils.data.Dataset):
    """Items that say which draw they are: (index, draw) keys, optionally in aspect-ratio buckets."""

    supports_draw_keys = True

    def __init__(self, size: int, bucket_ids: list[int] | None = None):
        self.size, self.bucket_ids = size, bucket_ids

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, key):
        return {"index": int(key[0]), "draw": int(key[1])}


def rank_stream(dataset, rank_batch: int, rank: int, skip: int, steps: int) -> list[list[tuple[int, int]]]:
    """What rank ``rank`` of 2 loads: accelerate's prepared loader with train()'s settings."""
    from accelerate.data_loader import prepare_data_loader

    loader = training_loader(dataset, rank_batch * 2, seed=3, skip=skip)
    prepared = prepare_data_loader(loader, num_processes=2, process_index=rank, split_batches=True)
    stream = iter(prepared)
    batches = [next(stream) for _ in range(steps)]
    stream.close()
    prepared.end()
    return [list(zip(b["index"].tolist(), b["draw"].tolist(), strict=True)) for b in batches]


@pytest.mark.parametrize("buckets", [None, [0, 1, 1, 0, 1]], ids=["plain", "bucketed"])
def test_ranks_split_each_global_batch_and_its_noise_seeds_like_one_process(buckets):
    # Batch 2 per rank x 2 ranks x 3 steps, resumed after 4 global draws: the ranks' slices join into
    # exactly the single process's batches of 4 (with buckets too: one bucket per global batch).
    dataset = Keys(5, buckets)
    single = [
        list(zip(b["index"].tolist(), b["draw"].tolist(), strict=True))
        for b, _ in zip(training_loader(dataset, 4, seed=3, skip=4), range(3))
    ]
    ranks = [rank_stream(dataset, 2, r, skip=4, steps=3) for r in (0, 1)]
    assert [ranks[0][step] + ranks[1][step] for step in range(3)] == single
    if buckets is not None:  # every rank of a step trains the same bucket (one shape)
        assert all(len({buckets[i] for i, _ in batch}) == 1 for batch in single)
    # The noise seeds of step 5: rank r's batch starts at global index r x batch.
    assert noise_seeds(7, 5, 0, 2) + noise_seeds(7, 5, 2, 2) == noise_seeds(7, 5, 0, 4)
    assert len(set(noise_seeds(7, 5, 0, 4) + noise_seeds(7, 6, 0, 4))) == 8
