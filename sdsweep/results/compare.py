"""Comparison parts of the report: the Pareto front of a multi-objective study, one row per
model x method (each against its own model's baseline), per-method learning-rate panels and a
contact sheet per method. Reads only ``StudyData``; never imports torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from sdsweep import io
from sdsweep.metric_names import LR_KEY, STEP_KEY, fmt_number, fmt_sci, label
from sdsweep.results.study_folder import StudyData, best_trial, first_sample_name
from sdsweep.results.table import is_feasible, pareto_front
from sdsweep.study.record import TrialState

# Columns a trial may record for its peak accelerator memory (the first present wins).
PEAK_MEMORY_COLUMNS = ("peak_memory_gb", "train/peak_memory_gb", "peak_memory_mb", "train/peak_memory_mb")
MAX_SHEET_COLUMNS = 6


def objectives_of(data: StudyData) -> list[tuple[str, str]]:
    specs = data.info.get("objectives") or [{"metric": "eval/clip_score", "direction": "maximize"}]
    return [(o["metric"], o.get("direction", "maximize")) for o in specs]


def baseline_for(data: StudyData, model: Any) -> dict[str, float] | None:
    return data.baseline_for(model)


def weights_bytes(data: StudyData, trial: int) -> int | None:
    """Total size of the trial's saved weights (the folder is found relative to the study folder, so a
    copied or moved study still measures its own files); None when they were not kept."""
    record = data.records.get(trial)
    relative = record.weights if record else None
    folder = data.paths.trial(trial) / relative if relative else None
    if folder is None or not folder.is_dir():
        return None
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def fmt_bytes(size: int | None) -> str:
    if size is None:
        return "–"
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.3g} {unit}"
        size /= 1024
    return "–"


def _peak_memory(row: dict[str, Any]) -> str:
    for column in PEAK_MEMORY_COLUMNS:
        value = row.get(column)
        if isinstance(value, (int, float)) and value == value:
            unit = "MB" if column.endswith("_mb") else "GB"
            return f"{fmt_number(float(value))} {unit}"
    return "–"


@dataclass
class ComparisonTable:
    columns: list[str]
    rows: list[list[str]]
    notes: list[str] = field(default_factory=list)


def comparison_table(data: StudyData, metrics: list[str]) -> ComparisonTable:
    """One row per model x method: its best trial (the shared rule), lr, steps, metrics with the delta
    against that model's own baseline, training time, peak memory and weights size."""
    frame = data.results
    objectives = objectives_of(data)
    columns = ["model", "method", "trials", "best", "lr", "steps"] + [label(m) for m in metrics]
    columns += ["train time", "peak memory", "weights"]
    table = ComparisonTable(columns, [])
    if frame.empty or "method" not in frame:
        return table
    # A damaged trial has no model or method: it is listed in the leaderboard, not compared here.
    keys = frame[["model", "method"]].dropna().astype(str).drop_duplicates().itertuples(index=False)
    for model, method in sorted(keys):
        group = frame[(frame["model"].astype(str) == model) & (frame["method"].astype(str) == method)]
        best = best_trial(group, objectives)
        baseline = baseline_for(data, model)
        if baseline is None:
            table.notes.append(f"{model}: no baseline measured for this model, so no deltas.")
        if best is None:
            table.rows.append([model, method, str(len(group)), "none complete"] + ["–"] * (len(columns) - 4))
            continue
        lr = best.get(LR_KEY)
        steps = best.get(STEP_KEY)
        cells = [model, method, str(len(group)), f"{int(best['trial']):04d}"]
        cells += [fmt_sci(lr) if isinstance(lr, (int, float)) else "–", fmt_number(steps)]
        for metric in metrics:
            value = best.get(metric)
            if not isinstance(value, (int, float)):
                cells.append("–")
            elif baseline and metric in baseline:
                cells.append(f"{fmt_number(float(value))} ({float(value) - baseline[metric]:+.3g})")
            else:
                cells.append(fmt_number(float(value)))
        seconds = best.get("train_seconds")
        cells.append(f"{seconds:.0f} s" if isinstance(seconds, (int, float)) else "–")
        cells += [_peak_memory(best), fmt_bytes(weights_bytes(data, int(best["trial"])))]
        table.rows.append(cells)
    return table


# ---- figures ---------------------------------------------------------------------------------------------


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def pareto_plot(data: StudyData, out_png: Path, dpi: int = 200) -> Path | str:
    """The first two objectives of every complete trial, the Pareto front joined and highlighted,
    every trial named, the best (study_folder.best_trial) starred."""
    objectives = objectives_of(data)
    if len(objectives) < 2:
        return "single-objective study: no Pareto front"
    (mx, dx), (my, dy) = objectives[:2]
    frame = data.results
    if frame.empty or mx not in frame or my not in frame:
        return f"no Pareto front: no trial has both {mx} and {my} yet"
    done = frame[(frame["state"] == TrialState.COMPLETE.value) & frame[mx].notna() & frame[my].notna()]
    if done.empty:
        return f"no Pareto front: no COMPLETE trial has both {mx} and {my} yet"
    front = set(pareto_front(frame, objectives[:2], feasible_only=False))
    best = best_trial(frame, objectives)
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(10, 6))
    for _, row in done.iterrows():
        trial = int(row["trial"])
        on_front = trial in front
        feasible = is_feasible(row.get("feasible"))
        ax.scatter(
            row[mx],
            row[my],
            s=90 if on_front else 40,
            color="#e8590c" if on_front else "#868e96",
            marker="o" if feasible else "x",
            zorder=3,
        )
        ax.annotate(
            f"t{trial:04d}", (row[mx], row[my]), textcoords="offset points", xytext=(6, 4), fontsize=9
        )
    line = done[done["trial"].isin(front)].sort_values(mx)
    ax.plot(line[mx], line[my], color="#e8590c", lw=1.5, label="Pareto front", zorder=2)
    if best is not None:
        ax.scatter(
            best[mx],
            best[my],
            s=320,
            marker="*",
            color="#f59f00",
            edgecolor="black",
            zorder=4,
            label=f"best: t{int(best['trial']):04d} (closest to utopia)",
        )
    ax.set_xlabel(label(mx) + f"  ({dx})")
    ax.set_ylabel(label(my) + f"  ({dy})")
    title = "Pareto front"
    if len(objectives) > 2:
        title += f" (first two of {len(objectives)} objectives)"
    ax.set_title(title)
    ax.margins(0.1)  # room for the trial names at the edges
    ax.legend(fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_png, dpi=dpi)
    plt.close(fig)
    return out_png


def lr_panels(data: StudyData, out_png: Path, dpi: int = 200) -> Path | str:
    """The first objective against the learning rate, one panel per method (each its own lr axis):
    methods with lr ranges decades apart are never squeezed onto one axis."""
    frame = data.results
    metric, _ = objectives_of(data)[0]
    if frame.empty or LR_KEY not in frame or metric not in frame or "method" not in frame:
        return "no per-method learning-rate panels: no trial has a learning rate and the first objective yet"
    methods = sorted(frame["method"].dropna().astype(str).unique())
    if len(methods) < 2:
        return "one method only: see the heatmaps"
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(methods), figsize=(4 * len(methods) + 1, 4), squeeze=False)
    for ax, method in zip(axes[0], methods):
        rows = frame[(frame["method"].astype(str) == method) & (frame["state"] == TrialState.COMPLETE.value)]
        rows = rows[rows[LR_KEY].notna() & rows[metric].notna()]
        for model, part in rows.groupby(rows["model"].astype(str)):
            ax.scatter(part[LR_KEY].astype(float), part[metric].astype(float), label=model)
        ax.set_xscale("log")
        ax.set_title(method)
        ax.set_xlabel("learning rate")
        if len(rows):
            ax.legend(fontsize=8)
    axes[0][0].set_ylabel(label(metric))
    fig.tight_layout()
    fig.savefig(out_png, dpi=dpi)
    plt.close(fig)
    return out_png


def method_sheets(data: StudyData, out_dir: Path, dpi: int = 150) -> list[Path]:
    """Per method (studies with several): the baseline, then up to six COMPLETE trials best-first,
    first prompt and seed."""
    frame = data.results
    if frame.empty or "method" not in frame:
        return []

    if frame["method"].dropna().astype(str).nunique() < 2:
        return []  # one method: the lr x steps contact sheet already shows it
    objectives = objectives_of(data)
    sample = first_sample_name(data)
    plt = _pyplot()
    written = []
    for method in sorted(frame["method"].dropna().astype(str).unique()):
        rows = frame[(frame["method"].astype(str) == method) & (frame["state"] == TrialState.COMPLETE.value)]
        ranked = _ranked(rows, objectives)[:MAX_SHEET_COLUMNS]
        if not ranked:
            continue
        cells = [("baseline (untuned)", data.paths.baseline / io.TRIAL_SAMPLES / sample)]
        for row in ranked:
            lr = row.get(LR_KEY)
            name = f"t{int(row['trial']):04d} {row.get('model')}"
            name += f"\nlr={fmt_sci(lr)}" if isinstance(lr, (int, float)) else ""
            name += f" steps={fmt_number(row.get(STEP_KEY))}" if row.get(STEP_KEY) is not None else ""
            cells.append((name, data.paths.trial(int(row["trial"])) / io.TRIAL_SAMPLES / sample))
        fig, axes = plt.subplots(1, len(cells), figsize=(2.6 * len(cells), 3.2), squeeze=False)
        for ax, (name, path) in zip(axes[0], cells):
            ax.set_xticks([])
            ax.set_yticks([])
            if path.is_file():
                from PIL import Image

                with Image.open(path) as image:
                    ax.imshow(image.convert("RGB"), interpolation="nearest")
            else:
                ax.text(0.5, 0.5, "no image", ha="center", va="center", transform=ax.transAxes)
            ax.set_xlabel(name, fontsize=9)
        fig.suptitle(f"{method}: best trials first ({sample.removesuffix('.png')})", fontsize=11)
        fig.tight_layout()
        path = out_dir / f"method_sheet_{method}.png"
        fig.savefig(path, dpi=dpi)
        plt.close(fig)
        written.append(path)
    return written


def _ranked(rows: pd.DataFrame, objectives: list[tuple[str, str]]) -> list[dict[str, Any]]:
    """Best first by the shared rule, applied repeatedly to what is left."""
    ranked = []
    left = rows
    while not left.empty:
        best = best_trial(left, objectives)
        if best is None:
            break
        ranked.append(best)
        left = left[left["trial"] != best["trial"]]
    return ranked
