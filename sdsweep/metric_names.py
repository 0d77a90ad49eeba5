"""How metrics read to a person: which way is better, which columns are internal flags, which warnings
qualify which numbers, and numbers formatted for reading. Used by the report and the model card.

Everything is keyed by metric *name*, so a metric added later (``eval/fd_clip``, ``truth/...``) gets an
arrow by adding one line here, and an unknown metric still renders, just without an arrow.
"""

from __future__ import annotations

import math
import re
from typing import Any

UP, DOWN = "↑", "↓"

# Last path component of a metric (``eval/clip_score`` -> ``clip_score``) -> the better direction.
DIRECTIONS: dict[str, str] = {
    "clip_score": UP,
    "prior_clip_score": UP,
    "clip_i": UP,
    "dino": UP,
    "cmmd": DOWN,
    "appropriate_rate": UP,
    "fid": DOWN,
    "fd_clip": DOWN,
    "kid": DOWN,
    "kd_clip": DOWN,
    "lpips": DOWN,
    "val_loss": DOWN,
}
# Whole families where higher is better (a held-out truth check, human ratings).
DIRECTION_PREFIXES: dict[str, str] = {"truth/": UP, "human/": UP, "eval/val_loss/": DOWN}

# A metric's interval in results.csv, W&B and Optuna: ``<metric>/lo`` and ``<metric>/hi`` (the 95% interval)
# and ``<metric>/se`` (its standard error), e.g. ``eval/clip_score/lo``. A metric without one is named,
# with the reason, in the ``no_interval`` column.
INTERVAL_PARTS = ("lo", "hi", "se")

# Bookkeeping columns that look like metrics but are flags for the code (e.g. ``eval/fid_reliable``).
INTERNAL_SUFFIXES = ("_reliable",)

# A warning qualifies a metric when it names the metric's short form (``FID on 8 images is unreliable``).
WARNING_WORDS: dict[str, tuple[str, ...]] = {
    "fid": ("FID",),
    "fd_clip": ("FID", "FD_CLIP", "FD-CLIP"),
    "kid": ("KID",),
    "kd_clip": ("KID", "KD_CLIP", "KD-CLIP"),
}


def short_name(metric: str) -> str:
    return metric.rsplit("/", 1)[-1]


def direction_arrow(metric: str) -> str:
    """``↑`` (higher is better), ``↓`` (lower is better) or ``""`` for a metric this table does not know."""
    for prefix, arrow in DIRECTION_PREFIXES.items():
        if metric.startswith(prefix):
            return arrow
    return DIRECTIONS.get(short_name(metric), "")


def label(metric: str) -> str:
    """``eval/clip_score ↑``; an unknown metric keeps its bare name."""
    arrow = direction_arrow(metric)
    return f"{metric} {arrow}" if arrow else metric


def direction_words(metric: str) -> str:
    return {UP: "higher is better", DOWN: "lower is better"}.get(direction_arrow(metric), "")


def is_internal(metric: str) -> bool:
    return short_name(metric).endswith(INTERNAL_SUFFIXES)


def warnings_for(metric: str, warnings: str | list[str] | None) -> list[str]:
    """The warnings (a ``; ``-joined results.csv cell or a list) that qualify this metric's number."""
    if not warnings or (isinstance(warnings, float) and math.isnan(warnings)):
        return []
    # results.csv joins warnings with "; ", and a warning may contain "; " itself: split after a full stop.
    items = re.split(r"(?<=\.); ", warnings) if isinstance(warnings, str) else list(warnings)
    words = WARNING_WORDS.get(short_name(metric), ())
    return [w for w in items if metric in w or any(word in w for word in words)]


def fmt_number(value: Any) -> str:
    """4 significant digits; very small or large values in short scientific form (``1e-4``, ``3.2e-5``)."""
    if value is None or isinstance(value, bool):
        return "–" if value is None else str(value)
    if not isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, float) and not math.isfinite(value):
        return "–" if math.isnan(value) else str(value)
    if isinstance(value, int) or float(value).is_integer() and abs(value) < 1e6:
        return str(int(value))
    if value != 0 and (abs(value) < 1e-3 or abs(value) >= 1e6):
        return fmt_sci(value)
    return f"{value:.4g}"


def fmt_sci(value: float) -> str:
    """``1e-4`` rather than ``1e-04`` or ``0.0001``: short, and readable next to its neighbours."""
    mantissa, exponent = f"{float(value):.3e}".split("e")
    mantissa = mantissa.rstrip("0").rstrip(".")
    return f"{mantissa}e{int(exponent)}"


def fmt(value: Any) -> str:
    """A table cell: ``–`` for a missing value."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return fmt_number(value)


def fmt_param(key: str, value: Any) -> str:
    """A parameter value: the learning rate in short scientific notation, whole numbers without ``.0``."""
    number = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if key == LR_KEY and number:
        return fmt_sci(value)
    if number and float(value).is_integer():
        return str(int(value))
    return fmt(value)


# The swept learning rate and step count, defined once here (a leaf: the report and the planner import
# them without the config schema).
LR_KEY = "method.learning_rate"
STEP_KEY = "train.max_train_steps"


def short_label(key: str) -> str:
    return {LR_KEY: "lr", STEP_KEY: "steps"}.get(key, key.split(".")[-1])


def metric_columns(results: Any) -> list[str]:
    """Headline metrics of a results table (``eval/clip_score``, not the per-prompt ``eval/clip_score/p0``);
    internal flags such as ``eval/fid_reliable`` are not metrics and never shown as one."""
    return sorted(
        c for c in results.columns if c.startswith("eval/") and c.count("/") == 1 and not is_internal(c)
    )


# The learned LPIPS networks torchmetrics ships; any other feature network gets its own metric name.
TORCHMETRICS_LPIPS_NETS = ("alex", "vgg", "squeeze")


def lpips_key(backbone: str) -> str:
    """``eval/lpips`` only for the real learned LPIPS; other feature networks are named in the key."""
    return "eval/lpips" if backbone in TORCHMETRICS_LPIPS_NETS else f"eval/lpips_{backbone}"
