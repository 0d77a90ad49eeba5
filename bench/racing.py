"""Section 6, racing: the evaluation images confirmation spends to reach a pick, against evaluating every
trial with the full budget.

One tiny grid is swept twice with the same training (deterministic on the CPU, so the same weights):
- **full:** every trial evaluated with ``FULL`` images per prompt;
- **raced:** every trial evaluated with ``START`` images per prompt, then ``python -m sdsweep.confirm``
  re-evaluates only the contenders (the best and the trials not separable from it, and those uncertain on a
  constraint), ``START`` more per prompt per round, until separated or ``FULL`` per prompt.
The ratio is images (raced) / images (full), with whether the two picks are the same configuration.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pandas as pd

GRID = {"learning_rates": "[1e-4,3e-3,1e-2]", "steps": "[4,8]"}
FULL, START = 8, 2


def run(quick: bool, workdir: Path, log) -> dict[str, Any]:
    full, start = (4, 2) if quick else (FULL, START)
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    out: dict[str, Any] = {"grid": GRID, "full_per_prompt": full, "start_per_prompt": start}
    picks = {}
    for arm, per_prompt in (("full", full), ("raced", start)):
        started = time.perf_counter()
        sweep(workdir, arm, per_prompt, env)
        if arm == "raced":
            study = workdir / arm
            budget = full * prompts(study)
            confirm = [sys.executable, "-m", "sdsweep.confirm", str(study), "--per-round", str(start)]
            subprocess.run([*confirm, "--budget", str(budget)], check=True, env=env, capture_output=True)
        images, trials = spent(workdir / arm)
        picks[arm] = pick(workdir / arm)
        out[arm] = {
            "images": images,
            "trials": trials,
            "wall_seconds": round(time.perf_counter() - started, 1),
        }
        out[arm].update(picks[arm])
        log(f"racing {arm}: {images} images over {trials} trials, pick {picks[arm]}")
    out["ratio_images_raced_vs_full"] = round(out["raced"]["images"] / out["full"]["images"], 3)
    out["same_pick"] = picks["raced"]["configuration"] == picks["full"]["configuration"]
    # When the full evaluation cannot separate its best, any trial tied with it is an equally good answer.
    out["raced_pick_in_full_tied_set"] = (
        picks["raced"]["configuration"] in picks["full"]["tied_configurations"]
    )
    return out


def sweep(workdir: Path, arm: str, per_prompt: int, env: dict[str, str]) -> None:
    command = [
        sys.executable,
        "-m",
        "sdsweep",
        "+experiment=demo_tiny",
        f"paths.root={workdir}",
        f"study={arm}",
        "tracking=none",
        "sweep.keep_best_k=-1",
        "sweep.build_report=false",
        f"sweep.learning_rates={GRID['learning_rates']}",
        f"sweep.steps={GRID['steps']}",
        f"eval.num_images_per_prompt={per_prompt}",
    ]
    subprocess.run(command, check=True, env=env, capture_output=True)


def prompts(study: Path) -> int:
    return len(json.loads((study / "study.json").read_text())["eval"]["prompts"])


def spent(study: Path) -> tuple[int, int]:
    """Evaluation images the trials received (every unit row of every trial's units.csv)."""
    tables = [pd.read_csv(path) for path in sorted((study / "trials").glob("*/units.csv"))]
    return sum(len(t) for t in tables), len(tables)


def pick(study: Path) -> dict[str, Any]:
    verdict = json.loads((study / "verdict.json").read_text())
    best = verdict["best"]
    results = pd.read_csv(study / "results.csv").set_index("trial")

    def configuration(trial: int) -> list:
        row = results.loc[trial]
        return [float(row["method.learning_rate"]), int(row["train.max_train_steps"])]

    return {
        "best": int(best),
        "configuration": configuration(best),
        "separated": verdict["separated"],
        "tied_configurations": [configuration(t) for t in [best, *verdict["tied"]]],
    }
