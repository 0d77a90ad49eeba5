"""Sweep constraints such as ``eval/appropriate_rate >= 0.75``.

Optuna's constrained samplers read a list of floats where <= 0 means satisfied, so each constraint
is turned into such a "violation" number; a missing metric counts as violated.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

_PATTERN = re.compile(r"^\s*([A-Za-z0-9_/.\-]+)\s*(>=|<=|>|<)\s*([-+0-9.eE]+)\s*$")


@dataclass(frozen=True)
class Constraint:
    metric: str
    op: str
    threshold: float

    def violation(self, metrics: dict) -> float:
        value = metrics.get(self.metric)
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return 1.0
        if self.op in (">=", ">"):
            return self.threshold - float(value) + (1e-12 if self.op == ">" else 0.0)
        return float(value) - self.threshold + (1e-12 if self.op == "<" else 0.0)

    def satisfied(self, metrics: dict) -> bool:
        return self.violation(metrics) <= 0

    def __str__(self) -> str:
        return f"{self.metric} {self.op} {self.threshold:g}"


def parse_constraint(text: str) -> Constraint:
    from sdsweep.config import ConfigError

    match = _PATTERN.match(text)
    if not match:
        raise ConfigError(
            f"Invalid sweep constraint {text!r}: write it as '<metric> <op> <number>', "
            "e.g. 'eval/appropriate_rate >= 0.75' (op is one of >=, <=, >, <)."
        )
    return Constraint(match.group(1), match.group(2), float(match.group(3)))
