"""Per-unit results: one row per evaluation unit, and every per-image metric computed from those rows.

An evaluation unit is one generated image: one (prompt, seed) pair, or one held-out caption under
``eval.protocol=heldout_captions``. Every trial and the baseline see the same units, so two models can be
compared unit by unit (paired), and a metric's uncertainty is the spread of its units. The table is saved
as ``units.csv`` beside ``metrics.json``; confirmation rounds (``python -m sdsweep.confirm``) append rows
with fresh seeds, and the metrics are recomputed from the whole table with ``summarize``.

Columns: ``group`` (``concept`` for ``eval.prompts`` or held-out captions, ``prior`` for
``eval.prior_prompts``), ``prompt_index`` (global, as in the sample file names), ``group_prompt`` (the
index within the group: the ``/p{i}`` of per-prompt keys), ``prompt``, ``seed``, ``round`` (0 for the
trial's own evaluation, k for the k-th confirmation round), then one column per score:
``clip`` (CLIP score of the image with its prompt), ``clip_i`` (mean CLIP-I similarity to the instance
images; concept only), ``dino`` (the same with DINO embeddings), ``appropriate`` (1/0), ``lpips``/``lpips_clip`` (paired with its photo;
held-out captions only), ``truth`` (1/0: the judge saw what was asked) with ``truth_group``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from sdsweep import io
from sdsweep.uncertainty import Interval, mean_interval, rate_interval

UNITS_FILE = "units.csv"
KEY_COLUMNS = ["group", "prompt_index", "seed"]  # what makes two rows the same unit in two trials
CONCEPT, PRIOR = "concept", "prior"

# Metrics that are one number for the whole image set: there is no per-image score to resample, and a
# bootstrap over images would recompute the feature statistics hundreds of times. Said, not hidden.
SET_STATISTIC = "a set statistic (one value for the whole image set), not a mean over images"
FIXED_DRAWS = "fixed noise draws on the held-out images, the same for every trial: no sampling spread"
FLAG = "a flag, not a measurement"


@dataclass(frozen=True)
class UnitMetric:
    """How one metric key is computed from the unit table: which column, over which rows, mean or rate."""

    key: str
    column: str
    group: str | None = None  # None: every unit
    group_prompt: int | None = None  # a per-prompt key (``/p{i}``)
    rate: bool = False  # a share of 0/1 values (Wilson interval) rather than a mean (bootstrap)
    by_truth_group: bool = False  # the judge's own grouping (``truth_group``) rather than ``group``

    def rows(self, units: pd.DataFrame) -> pd.DataFrame:
        group_column = "truth_group" if self.by_truth_group else "group"
        rows = units
        if self.group is not None:
            rows = rows[rows[group_column] == self.group]
        if self.group_prompt is not None:
            rows = rows[rows["group_prompt"] == self.group_prompt]
        return rows[pd.to_numeric(rows[self.column], errors="coerce").notna()]

    def values(self, units: pd.DataFrame) -> pd.DataFrame:
        """The rows with this metric's value as ``value`` and the unit key: what paired comparisons join on."""
        rows = self.rows(units)
        return rows[KEY_COLUMNS].assign(value=pd.to_numeric(rows[self.column]).astype(float))

    def interval(self, units: pd.DataFrame, seed: int = 0) -> Interval:
        rows = self.rows(units)
        values = pd.to_numeric(rows[self.column]).to_numpy(dtype=float)
        if self.rate:
            return rate_interval(values)
        return mean_interval(values, strata=rows["prompt_index"].to_numpy(), seed=seed)


def unit_metrics(units: pd.DataFrame, lpips_key: str | None = None) -> list[UnitMetric]:
    """Every metric the table can give, keyed exactly as the evaluator's metrics."""
    found: list[UnitMetric] = []
    if units.empty:
        return found
    present = set(units.columns)
    for group, key in ((CONCEPT, "eval/clip_score"), (PRIOR, "eval/prior_clip_score")):
        if "clip" in present and units.loc[units["group"] == group, "clip"].notna().any():
            found.append(UnitMetric(key, "clip", group))
            # Held-out captions: one image per caption, so the mean over the captions is the whole story
            # (prior prompts keep their per-prompt breakdown).
            if not (group == CONCEPT and _heldout(units)):
                prompts = sorted(units.loc[units["group"] == group, "group_prompt"].dropna().unique())
                found += [UnitMetric(f"{key}/p{int(i)}", "clip", group, int(i)) for i in prompts]
    if "clip_i" in present and units["clip_i"].notna().any():
        found.append(UnitMetric("eval/clip_i", "clip_i", CONCEPT))
    if "dino" in present and units["dino"].notna().any():
        found.append(UnitMetric("eval/dino", "dino", CONCEPT))
    if "appropriate" in present and units["appropriate"].notna().any():
        found.append(UnitMetric("eval/appropriate_rate", "appropriate", rate=True))
    if lpips_key and "lpips" in present and units["lpips"].notna().any():
        found.append(UnitMetric(lpips_key, "lpips", CONCEPT))
    if "truth" in present:
        for group in (CONCEPT, PRIOR):
            if (units.loc[units["truth_group"] == group, "truth"].notna()).any():
                found.append(
                    UnitMetric(f"truth/{group}_accuracy", "truth", group, rate=True, by_truth_group=True)
                )
    return found


def summarize(
    units: pd.DataFrame, lpips_key: str | None = None, seed: int = 0
) -> tuple[dict[str, float], dict[str, Interval]]:
    """The per-unit metrics (plain means and shares, as always) and their intervals, from the table."""
    values: dict[str, float] = {}
    intervals: dict[str, Interval] = {}
    for metric in unit_metrics(units, lpips_key):
        interval = metric.interval(units, seed=seed)
        values[metric.key] = float(interval.value)
        intervals[metric.key] = interval
    return values, intervals


def metric_for(key: str, units: pd.DataFrame, lpips_key: str | None = None) -> UnitMetric | None:
    """The unit definition of ``key``, or None when the key is not a per-unit metric (FD, KD, val_loss)."""
    return next((m for m in unit_metrics(units, lpips_key) if m.key == key), None)


def lpips_key_of(units: pd.DataFrame) -> str | None:
    """Held-out tables name their LPIPS flavour in the ``lpips_key`` column (``eval/lpips_clip``)."""
    if "lpips_key" in units.columns and units["lpips_key"].notna().any():
        return str(units["lpips_key"].dropna().iloc[0])
    return None


def no_interval_reasons(metrics: dict[str, float], intervals: dict[str, Interval]) -> dict[str, Interval]:
    """An explicit "no interval, because" for every numeric metric that has no per-unit definition."""
    out = {}
    for key, value in metrics.items():
        if key in intervals or not isinstance(value, (int, float)):
            continue
        if key.endswith("_reliable"):
            reason = FLAG
        elif key.endswith("/val_loss") or "/val_loss/" in key:
            reason = FIXED_DRAWS
        else:
            reason = SET_STATISTIC
        out[key] = Interval(float(value), None, None, None, 0, "none", reason)
    return out


def _heldout(units: pd.DataFrame) -> bool:
    return "protocol" in units.columns and (units["protocol"] == "heldout_captions").any()


# ---- the file ---------------------------------------------------------------------------------------------
def build_units(
    specs: Sequence,
    concept_count: int,
    concept_prompts: int,
    columns: dict[str, Sequence],
    protocol: str = "prompts",
    round_number: int = 0,
    lpips_key: str | None = None,
) -> pd.DataFrame:
    """The table for one evaluation: one row per generated image (specs in plan order), score columns given
    per image (a column shorter than the plan covers the concept's images only)."""
    rows = []
    for index, spec in enumerate(specs):
        concept = index < concept_count
        rows.append(
            {
                "group": CONCEPT if concept else PRIOR,
                "prompt_index": spec.prompt_index,
                "group_prompt": spec.prompt_index if concept else spec.prompt_index - concept_prompts,
                "prompt": spec.prompt,
                "seed": spec.seed,
                "round": round_number,
                "protocol": protocol,
            }
        )
    frame = pd.DataFrame(rows)
    if lpips_key:
        frame["lpips_key"] = lpips_key  # which LPIPS the lpips column holds (eval/lpips or eval/lpips_clip)
    for name, values in columns.items():
        padded = list(values) + [None] * (len(rows) - len(values))
        frame[name] = padded[: len(rows)]
    return frame


def write_units(folder: str | os.PathLike, units: pd.DataFrame) -> Path:
    return io.atomic_write_dataframe(Path(folder) / UNITS_FILE, units)


def read_units(folder: str | os.PathLike) -> pd.DataFrame | None:
    """The unit table of a trial or baseline folder; None when it was evaluated before units existed."""
    path = Path(folder) / UNITS_FILE
    if not path.is_file() or path.stat().st_size == 0:
        return None
    try:
        return pd.read_csv(path)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as error:
        raise io.DamagedFileError(f"{path} is damaged ({error}); re-evaluate or delete it.") from None


def read_units_or_none(folder: str | os.PathLike) -> pd.DataFrame | None:
    """``read_units`` for readers that list many folders: a damaged table reads as absent."""
    try:
        return read_units(folder)
    except io.DamagedFileError:
        return None


def paired_frame(a: pd.DataFrame, b: pd.DataFrame) -> pd.DataFrame:
    """Units both value frames (``UnitMetric.values``) hold, side by side: ``value_a``, ``value_b``."""
    return a.merge(b, on=KEY_COLUMNS, suffixes=("_a", "_b"))


def finite(values: Sequence[float]) -> np.ndarray:
    array = np.asarray(values, dtype=float)
    return array[np.isfinite(array)]


__all__ = [
    "UNITS_FILE",
    "UnitMetric",
    "build_units",
    "metric_for",
    "no_interval_reasons",
    "paired_frame",
    "read_units",
    "summarize",
    "unit_metrics",
    "write_units",
]
