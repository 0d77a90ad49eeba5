"""The report's "validation loss by noise level": ``eval/val_loss/t<lo>-<hi>`` per band, baseline vs. trials.

One line per model over the timestep bands (log scale: with epsilon prediction the loss at little noise can be
orders of magnitude above the loss at much noise), for the baseline, the best trial and one more: a trial given by number, or by default the
trial with the lowest overall ``eval/val_loss`` when that is not the best. Where the best trial's line is
below the baseline's, it learned at that noise level; above it, it lost what the base model knew there.
"""

from __future__ import annotations

import re
from pathlib import Path

from sdsweep.results.study_folder import StudyData, best_trial

BAND = re.compile(r"^eval/val_loss/t(\d+)-(\d+)$")


def band_values(metrics: dict) -> dict[tuple[int, int], float]:
    """{(lo, hi): loss} of one metrics dict, in band order; empty when it has no banded loss."""
    found = {}
    for key, value in (metrics or {}).items():
        match = BAND.match(key)
        if match and isinstance(value, (int, float)):
            found[int(match[1]), int(match[2])] = float(value)
    return dict(sorted(found.items()))


def _chosen(data: StudyData, best: int | None) -> int | None:
    rows = data.results
    if rows.empty or "eval/val_loss" not in rows.columns:
        return None
    rows = rows[(rows["state"] == "COMPLETE") & rows["eval/val_loss"].notna()]
    if best is not None:
        rows = rows[rows["trial"] != best]
    return None if rows.empty else int(rows.loc[rows["eval/val_loss"].idxmin(), "trial"])


def val_loss_band_plot(
    data: StudyData, out_png: Path, trial: int | None = None, dpi: int = 200
) -> Path | str:
    """The figure, or a note saying why there is none."""
    row = best_trial(data.results, data.objectives) if not data.results.empty else None
    best = int(row["trial"]) if row is not None else None
    other = trial if trial is not None else _chosen(data, best)
    lines = []
    if data.baseline is not None:
        lines.append(("baseline (untuned)", band_values(data.baseline.metrics), "#868e96"))
    second = "chosen" if trial is not None else "lowest val_loss"
    for number, name, colour in ((best, "best", "#e8590c"), (other, second, "#1c7ed6")):
        if number is None or (name != "best" and number == best):
            continue
        record = data.records.get(number)
        if record is not None:
            lines.append((f"trial {number} ({name})", band_values(record.metrics), colour))
    lines = [line for line in lines if line[1]]
    if not lines:
        return "no eval/val_loss/t<lo>-<hi> values (val_loss not in eval.metrics, or eval.val_loss_bands=0)"
    import matplotlib

    matplotlib.use("Agg")  # headless, as every report figure
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4))
    for label, values, colour in lines:
        names = [f"{lo}-{hi}" for lo, hi in values]
        ax.plot(names, list(values.values()), "o-", label=label, color=colour)
    ax.set_yscale("log")
    ax.set_xlabel("timestep band (low: little noise, high: mostly noise)")
    ax.set_ylabel("validation loss ↓ (fixed draws)")
    ax.set_title("Validation loss by noise level")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_png, dpi=dpi)
    plt.close(fig)
    return out_png
