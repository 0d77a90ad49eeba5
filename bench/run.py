"""``python -m bench``: what sdsweep's design buys, measured side by side in one run (GitHub issue #7).

1. Sweep cost (``bench.sweep_cost``): the seed study's lr x steps grid on the tiny model, run through the
   real sweep driver three ways (plain / latent cache / cache + milestone sharing), plus the
   subprocess-isolation cost.
2. Per-step overhead (``bench.step``): sdsweep's training loop against a bare PyTorch loop doing the same math.
3. Evaluation throughput (``bench.evaluation``): DPM-Solver++ at the eval step count against 50-step PNDM.
4. Training path (``bench.gpu``): sdsweep's own train(), methods and sampling: speed, counted FLOPs,
   UNet and end-to-end MFU, predicted and measured peak memory; full-size SD-1.5 on CUDA, the tiny model on CPU.
5. Parallel (``bench.parallel``): 1 vs 2 workers; the worker pool against in-process and plain (issue #11).

Usage: ``python -m bench --out bench/results.json [--quick] [--sections ...] [--gpu-dry-run] [--threads N]``.
Timings on a shared 2-core machine are noisy: blocks are interleaved and medians reported.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.machine import load_average, machine_info, set_threads
from bench.section import run_section
from bench.table import table
from bench.verdicts import RUN_TARGETS, judge, limits

SECTIONS = ("sweep", "step", "eval", "gpu", "parallel", "racing")


def log(message: str) -> None:
    print(f"[bench] {message}", flush=True)


def section_runners(args: argparse.Namespace, workdir: Path) -> dict[str, Callable[[], dict[str, Any]]]:
    """Each section, ready to run; imported only when it runs (the GPU one imports torch at the top)."""

    def run_sweep_cost() -> dict[str, Any]:
        from bench import sweep_cost

        return sweep_cost.run(args.quick, workdir / "sweep", log)

    def run_step() -> dict[str, Any]:
        from bench import step

        return step.run(args.quick)

    def run_evaluation() -> dict[str, Any]:
        from bench import evaluation

        return evaluation.run(args.quick)

    def run_gpu() -> dict[str, Any]:
        from bench import gpu

        return gpu.run(quick=args.quick, log=log, workdir=workdir / "training-path", dry_run=args.gpu_dry_run)

    def run_parallel() -> dict[str, Any]:
        from bench import parallel

        return parallel.run(args.quick, workdir / "parallel")

    def run_racing() -> dict[str, Any]:
        from bench import racing

        return racing.run(args.quick, workdir / "racing", log)

    return {
        "sweep": run_sweep_cost,
        "step": run_step,
        "eval": run_evaluation,
        "gpu": run_gpu,
        "parallel": run_parallel,
        "racing": run_racing,
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("bench/results.json"))
    parser.add_argument("--quick", action="store_true", help="tiny grid and few repeats (smoke test)")
    parser.add_argument("--sections", default=",".join(SECTIONS), help="comma-separated subset to run")
    parser.add_argument(
        "--gpu-dry-run",
        action="store_true",
        help="the gpu section on the CPU with the tiny model even where CUDA is available (numbers mean nothing)",
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
    args = parser.parse_args(argv)
    unknown = set(args.sections.split(",")) - set(SECTIONS)
    if unknown:
        parser.error(f"unknown sections {sorted(unknown)}; choose from {','.join(SECTIONS)}")
    return args


def main(argv: list[str] | None = None) -> int:
    from sdsweep.io import atomic_write_json

    args = parse_args(argv)
    set_threads(args.threads)
    wanted = set(args.sections.split(","))
    results: dict[str, Any] = {"machine": machine_info(), "quick": args.quick, "targets": limits(RUN_TARGETS)}
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="sdsweep-bench-") as tmp:
        workdir = args.workdir or Path(tmp)
        for name, fn in section_runners(args, workdir).items():
            if name in wanted:
                results[name] = run_section(name, fn, log)
    results["machine"]["load_average_1m_after"] = load_average()
    results["verdicts"] = judge(results, RUN_TARGETS)
    results["total_seconds"] = time.perf_counter() - started
    atomic_write_json(args.out, results)
    print(table(results))
    log(f"wrote {args.out} in {results['total_seconds']:.0f}s")
    return 1 if any("error" in results[name] for name in wanted) else 0


if __name__ == "__main__":
    sys.exit(main())
