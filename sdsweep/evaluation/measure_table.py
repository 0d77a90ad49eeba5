"""The table of measures an evaluation runs: every measure class by its ``eval.metrics`` name, built in order.

Apart from measures.py so that the measure classes of embedding_metrics.py can build on measures.py's base
without an import cycle.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from sdsweep.evaluation.embedding_metrics import ClipI, Cmmd, Dino
from sdsweep.evaluation.measures import (
    AppropriateRate,
    ClipScore,
    Fid,
    Kid,
    Lpips,
    Measure,
    Unavailable,
    ValLoss,
)

if TYPE_CHECKING:
    from sdsweep.evaluation.evaluate import Evaluator


def measure_classes() -> dict[str, type[Measure]]:
    """Every measure by its ``eval.metrics`` name."""
    found = (ClipScore, Fid, Kid, Lpips, ClipI, Dino, Cmmd, AppropriateRate, ValLoss)
    return {cls.name: cls for cls in found}


def build_measures(evaluator: Evaluator, names: list[str]) -> list[Measure]:
    """The table of measures for ``eval.metrics`` (in its order); those that cannot work say why."""
    classes = measure_classes()
    table: list[Measure] = []
    for name in names:
        measure = classes[name](evaluator)
        reason = evaluator.unavailable_reason(name)
        table.append(Unavailable(evaluator, measure, reason) if reason else measure)
    return table
