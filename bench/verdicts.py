"""The targets the issues set, and each measured ratio judged against its target."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Target:
    path: tuple[str, ...]  # where the measured ratio sits in the results, key by key
    limit: float
    higher_is_better: bool = False

    def label(self) -> str:
        return ("≥ " if self.higher_is_better else "≤ ") + f"{self.limit:g}"


# Read from the whole results of ``python -m bench``.
RUN_TARGETS = {
    # issue #7: cache + milestone sharing at most half the plain sweep's time
    "sweep_full_vs_plain": Target(("sweep", "ratio_full_vs_plain"), 0.5),
    # issue #7: sdsweep's step at most 10% slower than a bare loop
    "step_overhead": Target(("step", "ratio"), 1.1),
    # this bench's sanity floor: 25 DPM-Solver++ steps vs 50 PNDM steps (ideal ~2x)
    "eval_speedup": Target(("eval", "speedup"), 1.5, higher_is_better=True),
}
# Read from the parallel section alone (it also runs on its own: python -m bench.parallel).
PARALLEL_TARGETS = {
    # issue #11: 2 workers on 2 cores take at most 0.6x the time of 1
    "two_vs_one_worker": Target(("workers", "ratio_2_vs_1"), 0.6),
    # issue #11: the default isolation (worker pool) at most half the plain way
    "default_vs_plain": Target(("isolation", "ratio_default_vs_plain"), 0.5),
}


def limits(targets: dict[str, Target]) -> dict[str, float]:
    return {key: target.limit for key, target in targets.items()}


def judge(results: dict[str, Any], targets: dict[str, Target]) -> dict[str, dict[str, Any]]:
    """``{key: {value, target, pass}}`` for every target whose ratio was measured (a section not run or
    failed has none)."""
    out = {}
    for key, target in targets.items():
        value = measured(results, target.path)
        if value is None:
            continue
        passed = value >= target.limit if target.higher_is_better else value <= target.limit
        out[key] = {"value": value, "target": target.label(), "pass": passed}
    return out


def measured(results: dict[str, Any], path: tuple[str, ...]) -> float | None:
    value: Any = results
    for key in path:
        if not isinstance(value, dict) or key not in value:
            return None
        value = value[key]
    return value
