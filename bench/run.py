"""``make bench``: what sdsweep's design buys, measured side by side in one run (GitHub issue #7).

1. Sweep cost: the seed study's lr x steps grid on the tiny model, run through the real sweep driver
   three ways (plain / latent cache / cache + milestone sharing), plus the subprocess-isolation cost.
2. Per-step overhead: sdsweep's training loop against a bare PyTorch loop doing the same math.
3. Evaluation throughput: DPM-Solver++ at the eval step count against the 50-step PNDM default.
4. Training path (``bench.gpu``): sdsweep's own train(), methods and sampling: speed, counted FLOPs,
   UNet and end-to-end MFU, predicted and measured peak memory; full-size SD-1.5 on CUDA, the tiny model on CPU.

Usage: ``python -m bench --out bench/results.json [--quick] [--gpu-dry-run]``.
Timings on a shared 2-core machine are noisy: blocks are interleaved and medians reported.
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Offline before anything imports huggingface_hub or wandb: the bench never touches a network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("MPLBACKEND", "Agg")

TARGETS = {
    "sweep_full_vs_plain": 0.5,  # issue #7: cache + milestone sharing at most half the plain sweep's time
    "step_overhead": 1.1,  # issue #7: sdsweep's step at most 10% slower than a bare loop
    "eval_speedup": 1.5,  # this bench's sanity floor: 25 DPM-Solver++ steps vs 50 PNDM steps (ideal ~2x)
}

# The tiny model with the cheap evaluation used by every sweep arm (same in all arms, so it cancels).
TINY_SWEEP = [
    "model=tiny",
    "data=demo",
    "eval=tiny",
    "tracking=none",
    "method=full",
    "train.train_batch_size=2",
    "eval.metrics=[clip_score,appropriate_rate,val_loss]",
    "eval.num_images_per_prompt=1",
    "eval.num_inference_steps=2",
    "+sweep=lr_steps",
    # Costs paid once per sweep and identical in every arm (baseline evaluation, the HTML report) are
    # left out, so the ratio measures what the arms do differently.
    "eval.baseline=false",
    "sweep.build_report=false",
]
ARMS: dict[str, list[str]] = {
    "plain": ["train.use_latent_cache=false", "sweep.share_milestones=false", "sweep.isolation=inprocess"],
    "cache": ["train.use_latent_cache=true", "sweep.share_milestones=false", "sweep.isolation=inprocess"],
    "full": ["train.use_latent_cache=true", "sweep.share_milestones=true", "sweep.isolation=inprocess"],
    "full_subprocess": [
        "train.use_latent_cache=true",
        "sweep.share_milestones=true",
        "sweep.isolation=subprocess",
    ],
}


@dataclass(frozen=True)
class Plan:
    """How much of each section to run; ``--quick`` is for the smoke test, not for numbers."""

    learning_rates: tuple[float, ...]
    steps: tuple[int, ...]
    subprocess_arm: bool
    sweep_rounds: int  # each arm runs this many times (alternating order); the fastest counts
    step_block: int  # training steps per timed block
    step_repeats: int  # interleaved blocks per side
    eval_batch: int
    eval_repeats: int
    eval_steps: tuple[int, int]  # (DPM-Solver++ steps, PNDM steps)


# 2 learning rates x 4 step counts: the seed grid's shape, with enough steps that training, not the
# identical per-trial evaluation, is most of the cost (as it is on a GPU at 512 px).
FULL_PLAN = Plan((1e-4, 1e-3), (20, 40, 60, 80), True, 2, 20, 5, 8, 5, (25, 50))
QUICK_PLAN = Plan((1e-4,), (1, 2), False, 1, 3, 2, 2, 1, (5, 10))


def log(message: str) -> None:
    print(f"[bench] {message}", flush=True)


# ---- machine ----------------------------------------------------------------------------------------
def machine_info() -> dict[str, Any]:
    import torch

    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "cuda_available": torch.cuda.is_available(),
        "load_average_1m": os.getloadavg()[0],
        "command": " ".join(sys.argv),
    }


# ---- 1. sweep cost --------------------------------------------------------------------------------------
def sweep_overrides(plan: Plan, arm: str, root: Path) -> list[str]:
    """The arm's full override list; the study name is fixed, the fresh root keeps studies apart."""
    lrs = ",".join(f"{lr:g}" for lr in plan.learning_rates)
    steps = ",".join(str(s) for s in plan.steps)
    return (
        TINY_SWEEP
        + ARMS[arm]
        + [
            f"sweep.learning_rates=[{lrs}]",
            f"sweep.steps=[{steps}]",
            f"study=bench-{arm}",
            f"paths.root={root}",
        ]
    )


def timed_sweep(overrides: list[str]) -> dict[str, Any]:
    from sdsweep.sweep.driver import run_sweep

    started = time.perf_counter()
    outcome = run_sweep(overrides)
    return {
        "wall_seconds": time.perf_counter() - started,
        "runs_launched": outcome.runs_launched,
        "trials_launched": outcome.trials_launched,
        "states": outcome.states,
        "finished": outcome.finished,
        **time_breakdown(Path(outcome.study_dir)),
    }


def time_breakdown(study_dir: Path) -> dict[str, float]:
    """Evaluation seconds summed over the study's trial records and baseline (where the time went)."""
    from sdsweep import io

    records = [io.read_json(d / io.TRIAL_METRICS) or {} for d in io.StudyPaths(study_dir).trial_dirs()]
    baseline = io.read_json(study_dir / "baseline" / io.TRIAL_METRICS) or {}
    return {
        "eval_seconds": sum(float(r.get("eval_seconds") or 0.0) for r in records),
        "baseline_eval_seconds": float(baseline.get("eval_seconds") or 0.0),
    }


def warm_up_sweep(workdir: Path) -> None:
    """One untimed one-point sweep, so imports and first-call costs do not land on the first arm."""
    overrides = (
        TINY_SWEEP
        + ARMS["full"]
        + [
            "sweep.learning_rates=[1e-4]",
            "sweep.steps=[1]",
            "study=bench-warmup",
            f"paths.root={workdir / 'warmup'}",
        ]
    )
    timed_sweep(overrides)


def bench_sweep(plan: Plan, workdir: Path) -> dict[str, Any]:
    warm_up_sweep(workdir)
    arms = [a for a in ARMS if plan.subprocess_arm or a != "full_subprocess"]
    rounds: dict[str, list[dict[str, Any]]] = {arm: [] for arm in arms}
    for index in range(plan.sweep_rounds):
        # Alternate the order so slow drift (other jobs on the machine) does not favour one arm.
        for arm in arms if index % 2 == 0 else reversed(arms):
            log(f"sweep arm '{arm}' round {index + 1}: {' '.join(ARMS[arm])}")
            # A fresh root per arm and round: nothing cached, no finished grid points to skip.
            row = timed_sweep(sweep_overrides(plan, arm, workdir / f"{arm}-{index}"))
            rounds[arm].append(row)
            log(f"  {row['wall_seconds']:.1f}s, {row['runs_launched']} training runs")
    # Contention only ever adds time, so the fastest round is the best estimate of an arm's cost.
    results = {
        arm: {
            **min(rows, key=lambda r: r["wall_seconds"]),
            "all_wall_seconds": [r["wall_seconds"] for r in rows],
        }
        for arm, rows in rounds.items()
    }
    plain = results["plain"]["wall_seconds"]
    for row in results.values():
        row["ratio_to_plain"] = row["wall_seconds"] / plain
    out: dict[str, Any] = {
        "grid": {"learning_rates": list(plan.learning_rates), "steps": list(plan.steps)},
        "overrides_common": TINY_SWEEP,
        "arms": results,
        "ratio_full_vs_plain": results["full"]["ratio_to_plain"],
    }
    if "full_subprocess" in results:
        out["subprocess_overhead"] = (
            results["full_subprocess"]["wall_seconds"] / results["full"]["wall_seconds"]
        )
    return out


# ---- 2. per-step overhead -----------------------------------------------------------------------------
STEP_OVERRIDES = [
    "model=tiny",
    "data=demo",
    "method=full",
    "tracking=none",
    "train.train_batch_size=2",
    "train.use_latent_cache=false",  # the bare loop encodes pixels every step, so sdsweep does too
    "train.max_grad_norm=0",  # the bare loop does not clip; the same math on both sides
    "train.checkpoint_at_milestones=false",
]


def compose(overrides: list[str]):
    from sdsweep.config.compose import compose_typed

    return compose_typed(overrides)


def fresh_setup(cfg) -> tuple[Any, Any]:
    """Components + prepared full fine-tune method + the pixel dataset, as a trial builds them."""
    import torch

    from sdsweep.data.examples import load_examples
    from sdsweep.data.images import dataset_for
    from sdsweep.models.loading import load_components
    from sdsweep.training.methods import get_method

    device = torch.device("cpu")
    components = load_components(cfg, device)
    method = get_method(cfg.method.name)(cfg, components, device)
    method.prepare()
    return method, dataset_for(cfg, load_examples(cfg), method.transform_caption)


def sdsweep_block(cfg, method, dataset, steps: int) -> list[float]:
    """Per-step seconds of ``sdsweep.training.train.train`` (its own timestamps: setup excluded)."""
    from sdsweep.training.train import TrainHooks, train

    result = train(cfg, method, dataset, [steps], TrainHooks())
    return list(result.step_seconds)


class BareLoop:
    """The same step written as a bare loop: VAE encode, text encode, noise, UNet, MSE, AdamW."""

    def __init__(self, cfg, method, dataset):
        import torch

        from sdsweep.data.images import collate

        self.c = method.components
        self.dataset = dataset
        self.collate = collate
        self.batch_size = cfg.train.train_batch_size
        self.position = 0
        t = cfg.train
        self.optimizer = torch.optim.AdamW(
            [p for p in self.c.unet.parameters() if p.requires_grad],
            lr=cfg.method.learning_rate,
            betas=(t.adam_beta1, t.adam_beta2),
            eps=t.adam_epsilon,
            weight_decay=t.adam_weight_decay,
        )

    def next_batch(self) -> dict[str, Any]:
        n = len(self.dataset)
        picks = [(self.position + i) % n for i in range(self.batch_size)]
        self.position += self.batch_size
        return self.collate([self.dataset[i] for i in picks])

    def step(self) -> float:
        import torch
        import torch.nn.functional as F

        c = self.c
        batch = self.next_batch()
        with torch.no_grad():
            latents = c.vae.encode(batch["pixel_values"]).latent_dist.sample() * c.vae.config.scaling_factor
            ids = c.tokenizer(
                batch["captions"],
                padding="max_length",
                max_length=c.tokenizer.model_max_length,
                truncation=True,
                return_tensors="pt",
            ).input_ids
            text = c.text_encoder(ids, return_dict=False)[0]
        noise = torch.randn_like(latents)
        timesteps = torch.randint(0, c.noise_scheduler.config.num_train_timesteps, (latents.shape[0],))
        noisy = c.noise_scheduler.add_noise(latents, noise, timesteps)
        prediction = c.unet(noisy, timesteps, text, return_dict=False)[0]
        loss = F.mse_loss(prediction.float(), noise.float())
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    def block(self, steps: int) -> list[float]:
        times = []
        for _ in range(steps):
            tick = time.perf_counter()
            self.step()
            times.append(time.perf_counter() - tick)
        return times


def bench_step(plan: Plan) -> dict[str, Any]:
    import torch

    cfg = compose(STEP_OVERRIDES)
    torch.manual_seed(0)
    ours, ours_data = fresh_setup(cfg)
    bare_method, bare_data = fresh_setup(cfg)  # separate weights: each side trains its own copy
    bare = BareLoop(cfg, bare_method, bare_data)
    sdsweep_block(cfg, ours, ours_data, plan.step_block)  # warm-up, untimed
    bare.block(plan.step_block)
    ours_times: list[float] = []
    bare_times: list[float] = []
    for repeat in range(plan.step_repeats):  # interleaved, alternating who goes first
        sides = [
            ("sdsweep", lambda: sdsweep_block(cfg, ours, ours_data, plan.step_block)),
            ("bare", lambda: bare.block(plan.step_block)),
        ]
        for name, run_block in sides if repeat % 2 == 0 else reversed(sides):
            (ours_times if name == "sdsweep" else bare_times).extend(run_block())
    ours_median, bare_median = statistics.median(ours_times), statistics.median(bare_times)
    return {
        "config": STEP_OVERRIDES,
        "batch_size": cfg.train.train_batch_size,
        "resolution": cfg.model.resolution,
        "steps_per_block": plan.step_block,
        "blocks_per_side": plan.step_repeats,
        "sdsweep_median_step_seconds": ours_median,
        "bare_median_step_seconds": bare_median,
        "sdsweep_mean_step_seconds": statistics.fmean(ours_times),
        "bare_mean_step_seconds": statistics.fmean(bare_times),
        "ratio": ours_median / bare_median,
    }


# ---- 3. evaluation throughput -------------------------------------------------------------------------
def images_per_second(pipe, prompts: list[str], steps: int, resolution: int, guidance: float) -> float:
    import torch

    generators = [torch.Generator().manual_seed(1234 + i) for i in range(len(prompts))]
    started = time.perf_counter()
    pipe(
        prompts,
        num_inference_steps=steps,
        height=resolution,
        width=resolution,
        guidance_scale=guidance,
        generator=generators,
        output_type="pil",
    )
    return len(prompts) / (time.perf_counter() - started)


def bench_eval(plan: Plan) -> dict[str, Any]:
    from sdsweep.config.schema import EvalConfig
    from sdsweep.models import tiny
    from sdsweep.models.loading import load_pipeline

    source = str(tiny.ensure_tiny_model("sd15"))
    eval_cfg = EvalConfig()
    resolution = 32
    fast_steps, slow_steps = plan.eval_steps
    pipes = {
        "dpmsolver++": (load_pipeline(source, scheduler="dpmsolver++"), fast_steps),
        "pndm": (load_pipeline(source, scheduler="pndm"), slow_steps),
    }
    prompts = [eval_cfg.prompts[0]] * plan.eval_batch
    samples: dict[str, list[float]] = {name: [] for name in pipes}
    for pipe, steps in pipes.values():  # warm-up, untimed
        images_per_second(pipe, prompts, steps, resolution, eval_cfg.guidance_scale)
    for _ in range(plan.eval_repeats):  # interleaved so drift hits both samplers alike
        for name, (pipe, steps) in pipes.items():
            samples[name].append(images_per_second(pipe, prompts, steps, resolution, eval_cfg.guidance_scale))
    rows = {
        name: {"num_inference_steps": pipes[name][1], "images_per_second": statistics.median(values)}
        for name, values in samples.items()
    }
    return {
        "model": "tiny:sd15",
        "resolution": resolution,
        "batch_size": plan.eval_batch,
        "guidance_scale": eval_cfg.guidance_scale,
        "repeats": plan.eval_repeats,
        "samplers": rows,
        "speedup": rows["dpmsolver++"]["images_per_second"] / rows["pndm"]["images_per_second"],
    }


# ---- 4. GPU -------------------------------------------------------------------------------------------
def run_parallel_bench(out: dict[str, Any], quick: bool, workdir: Path) -> dict[str, Any]:
    from bench import parallel as bench_parallel

    return bench_parallel.run_parallel_bench(out, quick=quick, workdir=workdir)


def bench_gpu(quick: bool, workdir: Path) -> dict[str, Any]:
    from bench import gpu

    return gpu.run(quick=quick, log=log, workdir=workdir / "training-path")


# ---- verdicts, output ---------------------------------------------------------------------------------
def verdicts(results: dict[str, Any]) -> dict[str, Any]:
    """Each ratio against its target; lower is better except the eval speedup."""
    measured = {
        "sweep_full_vs_plain": results.get("sweep", {}).get("ratio_full_vs_plain"),
        "step_overhead": results.get("step", {}).get("ratio"),
        "eval_speedup": results.get("eval", {}).get("speedup"),
    }
    out = {}
    for key, value in measured.items():
        if value is None:
            continue
        higher_is_better = key == "eval_speedup"
        passed = value >= TARGETS[key] if higher_is_better else value <= TARGETS[key]
        out[key] = {
            "value": value,
            "target": ("≥ " if higher_is_better else "≤ ") + f"{TARGETS[key]:g}",
            "pass": passed,
        }
    return out


def fmt(value: Any, unit: str = "") -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3g}{unit}"
    return f"{value}{unit}"


def table(results: dict[str, Any]) -> str:
    lines = ["", "sdsweep bench " + results["machine"]["date"], ""]
    sweep = results.get("sweep")
    if sweep:
        lines.append(
            f"1. Sweep cost, tiny model, grid lr {sweep['grid']['learning_rates']} x steps {sweep['grid']['steps']}"
        )
        lines.append(f"   {'arm':<18}{'wall s':>9}{'runs':>6}{'trials':>8}{'x plain':>9}")
        for arm, row in sweep["arms"].items():
            lines.append(
                f"   {arm:<18}{row['wall_seconds']:>9.1f}{row['runs_launched']:>6}{row['trials_launched']:>8}"
                f"{row['ratio_to_plain']:>9.2f}"
            )
        if "subprocess_overhead" in sweep:
            lines.append(
                f"   subprocess isolation costs {sweep['subprocess_overhead']:.2f}x the in-process full arm"
            )
    step = results.get("step")
    if step:
        lines.append("")
        lines.append(
            f"2. Per-step time, tiny model, batch {step['batch_size']}, {step['resolution']} px (median)"
        )
        lines.append(
            f"   sdsweep train(): {step['sdsweep_median_step_seconds'] * 1e3:.1f} ms   "
            f"bare loop: {step['bare_median_step_seconds'] * 1e3:.1f} ms   ratio {step['ratio']:.3f}"
        )
    ev = results.get("eval")
    if ev:
        lines.append("")
        lines.append(f"3. Sampling throughput, tiny model, {ev['resolution']} px, batch {ev['batch_size']}")
        for name, row in ev["samplers"].items():
            lines.append(
                f"   {name:<12}{row['num_inference_steps']:>4} steps {row['images_per_second']:>8.2f} img/s"
            )
        lines.append(f"   speedup {ev['speedup']:.2f}x")
    lines.append("")
    lines += gpu_lines(results.get("gpu", {}))
    if "parallel" in results:
        from bench.parallel import table as parallel_table

        lines += ["", "5. " + parallel_table(results["parallel"])]
    lines.append("")
    lines.append("Targets:")
    for key, verdict in results.get("verdicts", {}).items():
        lines.append(
            f"   {key:<22}{verdict['value']:>8.3f}  {verdict['target']:<7} {'PASS' if verdict['pass'] else 'FAIL'}"
        )
    return "\n".join(lines)


def gpu_lines(gpu: dict[str, Any]) -> list[str]:
    if "error" in gpu:
        return [f"4. Training path: failed ({gpu['error']})"]
    if not gpu:
        return ["4. Training path: not run"]
    note = (
        "" if gpu["measured_on_gpu"] else " (no GPU: GPU figures not measured; CPU timings of the tiny model)"
    )
    lines = [
        f"4. Training path: {gpu['device_name']}, {gpu['model']}{note}",
        f"   {'method':<19}{'batch':>6}{'ckpt':>6}{'cache':>7}{'img/s':>9}{'MFU unet':>9}{'MFU e2e':>8}"
        f"{'pred GiB':>9}{'peak GiB':>9}",
    ]
    for row in gpu["training"]:
        head = f"   {row['method']:<19}{row['batch_size']:>6}{str(row['gradient_checkpointing'])[0]:>6}{str(row['latent_cache'])[0]:>7}"
        if "error" in row:
            lines.append(f"{head}  {row['error'][:60]}")
            continue
        lines.append(
            f"{head}{row['images_per_second']:>9.2f}{fmt(row['mfu_unet']):>9}{fmt(row['mfu_end_to_end']):>8}"
            f"{fmt(row['predicted_peak_gib']):>9}{fmt(row['measured_peak_gib']):>9}"
        )
    for s in gpu["sampling"]:
        if "error" in s:
            lines.append(f"   sampling {s['dtype']}: failed ({s['error'][:60]})")
        else:
            lines.append(
                f"   sampling {s['dtype']}: {s['num_inference_steps']} steps, {s['images_per_second']:.2f} img/s"
            )
    return lines


def run_section(results: dict[str, Any], name: str, fn: Callable[[], dict[str, Any]]) -> None:
    """A failing section is recorded with its error; the other sections still run."""
    log(f"section {name}")
    started = time.perf_counter()
    try:
        results[name] = fn()
    except Exception as error:  # the bench reports a broken section instead of losing every number
        results[name] = {"error": f"{type(error).__name__}: {error}"}
        log(f"section {name} failed: {results[name]['error']}")
    results[name]["section_seconds"] = time.perf_counter() - started


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("bench/results.json"))
    parser.add_argument("--quick", action="store_true", help="tiny grid and few repeats (smoke test)")
    parser.add_argument(
        "--sections", default="sweep,step,eval,gpu,parallel", help="comma-separated subset to run"
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch/OpenMP threads (0: torch's default); 1 is steadier on a busy machine",
    )
    parser.add_argument(
        "--workdir", type=Path, default=None, help="where sweep arms write (default: a temp dir)"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    set_threads(args.threads)
    plan = QUICK_PLAN if args.quick else FULL_PLAN
    wanted = set(args.sections.split(","))
    results: dict[str, Any] = {"machine": machine_info(), "quick": args.quick, "targets": TARGETS}
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="sdsweep-bench-") as tmp:
        workdir = args.workdir or Path(tmp)
        sections: dict[str, Callable[[], dict[str, Any]]] = {
            "sweep": lambda: bench_sweep(plan, workdir),
            "step": lambda: bench_step(plan),
            "eval": lambda: bench_eval(plan),
            "gpu": lambda: bench_gpu(args.quick, workdir),
            # 1 vs 2 workers, and the default worker pool against in-process and the plain way
            "parallel": lambda: run_parallel_bench({}, quick=args.quick, workdir=workdir / "parallel"),
        }
        for name, fn in sections.items():
            if name in wanted:
                run_section(results, name, fn)
    results["machine"]["load_average_1m_after"] = os.getloadavg()[0]
    results["verdicts"] = verdicts(results)
    results["total_seconds"] = time.perf_counter() - started
    from sdsweep.io import atomic_write_json

    atomic_write_json(args.out, results)
    print(table(results))
    log(f"wrote {args.out} in {results['total_seconds']:.0f}s")
    return 1 if any("error" in results.get(name, {}) for name in wanted) else 0


def set_threads(threads: int) -> None:
    """Pin torch threads here and, through OMP_NUM_THREADS, in subprocess workers too."""
    if threads <= 0:
        return
    os.environ["OMP_NUM_THREADS"] = str(threads)
    import torch

    torch.set_num_threads(threads)


def finite_positive(value: Any) -> bool:
    """For the smoke test: a ratio the bench reports must be a positive finite number."""
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


if __name__ == "__main__":
    sys.exit(main())
