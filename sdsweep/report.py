"""The local report of a finished (or partly finished) study: ``report.html`` and ``report.md``.

``python -m sdsweep.report experiments/<study> [--out DIR]``

Reads only the study folder (``study.json``, ``results.csv``, ``baseline/``, ``trials/*``) and the
Optuna storage named in ``study.json``; never imports torch, so it runs anywhere the folder is copied.
The HTML embeds every image as a base64 data URI (one file that works offline, attached to an
e-mail, ...); the markdown links the PNGs written to ``report_files/`` beside it.

Failed and pruned trials have no metrics: they stay in the leaderboard with their reason, show as
labelled grey cells in the contact sheet and heatmaps, and never count as the best trial.
"""

from __future__ import annotations

import argparse
import base64
import html
import os
import shutil
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from sdsweep import io, metric_names
from sdsweep.metric_names import fmt, fmt_param, fmt_sci
from sdsweep.results import is_feasible
from sdsweep.study_folder import (  # noqa: F401  load_study and StudyFolderError: re-exported for callers
    StudyData,
    StudyFolderError,
    best_feasible_trial,
    is_number,
    load_study,
)

LR_KEY = "method.learning_rate"  # same keys as sdsweep.plan (which imports the config schema)
STEP_KEY = "train.max_train_steps"
FILES_DIR = "report_files"
# Importances need a few points per parameter to mean anything.
MIN_TRIALS_FOR_IMPORTANCE = 4
MIN_PARAMS_FOR_IMPORTANCE = 2
MIN_TRIALS_FOR_HISTORY = 2
# 200 dpi: a 6-inch figure is 1200 px, the page's content width, so text stays sharp when shown full width.
FIGURE_DPI = 200
_STATE_COLOURS = {"COMPLETE": "#2b8a3e", "PRUNED": "#e67700", "FAIL": "#c92a2a"}


_is_number = is_number


def metric_columns(results: pd.DataFrame) -> list[str]:
    """Headline metrics (``eval/clip_score``, not the per-prompt ``eval/clip_score/p0``); internal flags
    such as ``eval/fid_reliable`` are not metrics and never shown as one."""
    return sorted(
        c
        for c in results.columns
        if c.startswith("eval/") and c.count("/") == 1 and not metric_names.is_internal(c)
    )


def short_label(key: str) -> str:
    return {LR_KEY: "lr", STEP_KEY: "steps"}.get(key, key.split(".")[-1])


# ---- leaderboard ------------------------------------------------------------------------------------


@dataclass
class Leaderboard:
    columns: list[str]
    rows: list[list[str]]
    best_trial: int | None
    row_trials: list[int | None]  # None for the baseline row
    # (row, column) -> the warnings that qualify that number (shown as ⚠ and listed under the table)
    cell_warnings: dict[tuple[int, int], list[str]] = field(default_factory=dict)

    @property
    def warnings(self) -> dict[str, list[str]]:
        """Column label -> the distinct warnings on its numbers, for the note under the table."""
        found: dict[str, list[str]] = {}
        for (_, column), items in sorted(self.cell_warnings.items()):
            bucket = found.setdefault(self.columns[column], [])
            bucket += [w for w in items if w not in bucket]
        return found


def build_leaderboard(data: StudyData) -> Leaderboard:
    """Complete trials sorted by the objective, then pruned/failed ones; the baseline last as reference."""
    frame = data.results
    metric, direction = data.objective
    metrics = metric_columns(frame)
    metrics = [metric] + [m for m in metrics if m != metric] if metric in metrics else metrics
    base = data.baseline_metrics
    best = best_feasible_trial(frame, data.objectives)
    columns = ["#", "trial", "state"] + [short_label(p) for p in data.params]
    columns += [metric_names.label(m) for m in metrics] + ["feasible", "note"]
    rows: list[list[str]] = []
    row_trials: list[int | None] = []
    cell_warnings: dict[tuple[int, int], list[str]] = {}
    if not frame.empty:
        complete = frame[
            (frame["state"] == "COMPLETE") & frame.get("objective", pd.Series(dtype=float)).notna()
        ]
        complete = complete.sort_values(["objective", "trial"], ascending=[direction == "minimize", True])
        others = frame.drop(complete.index).sort_values("trial")
        for rank, (_, row) in enumerate(pd.concat([complete, others]).iterrows(), 1):
            trial = int(row["trial"])
            cells = [
                str(rank) if trial in complete["trial"].values else "",
                f"{trial:04d}",
                str(row.get("state")),
            ]
            cells += [fmt_param(p, row.get(p)) for p in data.params]
            for m in metrics:
                qualifiers = metric_names.warnings_for(m, row.get("warnings"))
                cell = _with_delta(row.get(m), base.get(m))
                if qualifiers and cell != "–":
                    cell_warnings[(len(rows), len(cells))] = qualifiers
                    cell += " ⚠"
                cells.append(cell)
            state = row.get("state")
            cells.append(
                ("yes" if is_feasible(row.get("feasible")) else "no") if state == "COMPLETE" else "–"
            )
            cells.append(_note(row, best))
            rows.append(cells)
            row_trials.append(trial)
    if data.baseline:
        cells = ["", "baseline", "untuned"] + ["–" for _ in data.params]
        cells += [fmt(base.get(m)) for m in metrics] + ["–", "step 0 (reference for deltas)"]
        rows.append(cells)
        row_trials.append(None)
    return Leaderboard(columns, rows, int(best["trial"]) if best else None, row_trials, cell_warnings)


def _with_delta(value: Any, baseline: Any) -> str:
    if not _is_number(value):
        return "–"
    if not _is_number(baseline):
        return fmt(value)
    return f"{fmt(float(value))} ({float(value) - float(baseline):+.3g})"


def _note(row: pd.Series, best: dict[str, Any] | None) -> str:
    if best is not None and int(row["trial"]) == int(best["trial"]):
        return "best feasible trial"
    reason = row.get("fail_reason")
    if isinstance(reason, str) and reason:
        return reason if len(reason) < 160 else reason[:157] + "..."
    if row.get("state") == "COMPLETE" and not is_feasible(row.get("feasible")):
        return "violates a constraint"
    return ""


# ---- figures (matplotlib, Agg) ------------------------------------------------------------------------


@dataclass
class Figures:
    """PNG files written under ``report_files/`` and notes for what was skipped and why."""

    contact_sheet: Path | None = None
    heatmaps: list[Path] = field(default_factory=list)
    history: Path | None = None
    importances: Path | None = None
    importance_values: dict[str, float] = field(default_factory=dict)
    trial_grids: dict[int, Path] = field(default_factory=dict)
    baseline_grid: Path | None = None
    pareto: Path | None = None
    lr_panels: Path | None = None
    method_sheets: list[Path] = field(default_factory=list)
    notes: dict[str, str] = field(default_factory=dict)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # headless: no display on servers or in CI
    import matplotlib.pyplot as plt

    return plt


def _grid_axes(data: StudyData) -> tuple[list[float], list[int]] | None:
    """The lr and step values of an lr x steps sweep, or None when the study is not such a grid."""
    frame = data.results
    if frame.empty or LR_KEY not in frame or STEP_KEY not in frame:
        return None
    lrs = sorted({float(v) for v in frame[LR_KEY].dropna()})
    steps = sorted({int(v) for v in frame[STEP_KEY].dropna()})
    if len(lrs) < 1 or len(steps) < 1 or len(lrs) * len(steps) < 2:
        return None
    return lrs, steps


def _cell_rows(data: StudyData, lr: float, steps: int) -> pd.DataFrame:
    frame = data.results
    match = frame[
        (frame[LR_KEY].astype(float).sub(lr).abs() <= 1e-12 * max(1.0, abs(lr))) & (frame[STEP_KEY] == steps)
    ]
    return match.sort_values("trial")


def _cell_trial(data: StudyData, lr: float, steps: int) -> pd.Series | None:
    """The trial of a grid cell; a COMPLETE one wins over a failed retry of the same point."""
    match = _cell_rows(data, lr, steps)
    if match.empty:
        return None
    complete = match[match["state"] == "COMPLETE"]
    return (complete if not complete.empty else match).iloc[-1]


def first_sample_name(data: StudyData) -> str:
    seeds = (data.info.get("eval") or {}).get("seeds") or [0]
    return io.sample_name(0, int(seeds[0]))


def _open_image(path: Path):
    from PIL import Image

    with Image.open(path) as image:
        return image.convert("RGB")


def contact_sheet(data: StudyData, out_png: Path) -> Path | str:
    """Rows = learning rates, columns = steps, first prompt and seed; column 0 is the baseline (step 0)."""
    axes_values = _grid_axes(data)
    if axes_values is None:
        return (
            f"no contact sheet: the study does not sweep both {LR_KEY} and {STEP_KEY} "
            f"(params: {', '.join(data.params) or 'none'})"
        )
    lrs, steps = axes_values
    sample = first_sample_name(data)
    baseline_path = data.paths.baseline / io.TRIAL_SAMPLES / sample
    best = best_feasible_trial(data.results, data.objectives)
    plt = _pyplot()
    columns = [0] + steps
    fig, grid = plt.subplots(
        len(lrs), len(columns), figsize=(1.9 * len(columns) + 0.6, 1.9 * len(lrs) + 0.8), squeeze=False
    )
    for r, lr in enumerate(lrs):
        for c, step in enumerate(columns):
            ax = grid[r][c]
            ax.set_xticks([])
            ax.set_yticks([])
            if step == 0:
                path, label, colour = baseline_path, "baseline", "#495057"
            else:
                row = _cell_trial(data, lr, step)
                trial = int(row["trial"]) if row is not None else None
                state = str(row["state"]) if row is not None else "not run"
                path = data.paths.trial(trial) / io.TRIAL_SAMPLES / sample if trial is not None else None
                label = f"t{trial:04d} {state}" if trial is not None else state
                if state == "COMPLETE" and not is_feasible(row.get("feasible")):
                    label += " (infeasible)"
                colour = _STATE_COLOURS.get(state, "#868e96")
                if best is not None and trial == int(best["trial"]):
                    label += " ★ best"
                    for spine in ax.spines.values():
                        spine.set_edgecolor("#f59f00")
                        spine.set_linewidth(4)
            if path is not None and path.is_file():
                ax.imshow(_open_image(path), interpolation="nearest")
            else:
                ax.set_facecolor("#dee2e6")
                ax.text(0.5, 0.5, "no image", ha="center", va="center", transform=ax.transAxes, fontsize=8)
            ax.set_xlabel(label, fontsize=7, color=colour)
            if r == 0:
                ax.set_title("step 0" if step == 0 else f"steps={step}", fontsize=9)
            if c == 0:
                ax.set_ylabel(f"lr={fmt_sci(lr)}", fontsize=9)
    prompt = ((data.info.get("eval") or {}).get("prompts") or ["?"])[0]
    fig.suptitle(
        f'"{prompt}" · {sample.removesuffix(".png")}  (rows: learning rate, columns: training steps)',
        fontsize=9,
    )
    fig.tight_layout()
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=FIGURE_DPI)  # wide enough to fill the page at full resolution
    plt.close(fig)
    return out_png


def metric_heatmaps(data: StudyData, out_dir: Path) -> list[Path] | str:
    """One heatmap per headline metric over lr x steps; empty cells name the trial state."""
    axes_values = _grid_axes(data)
    if axes_values is None:
        return "no heatmaps: they need a sweep over both learning rate and steps"
    lrs, steps = axes_values
    metrics = metric_columns(data.results)
    if not metrics:
        return "no heatmaps: no trial has evaluation metrics yet"
    import numpy as np

    plt = _pyplot()
    written = []
    for metric in metrics:
        values = np.full((len(lrs), len(steps)), np.nan)
        labels = [["" for _ in steps] for _ in lrs]
        for r, lr in enumerate(lrs):
            for c, step in enumerate(steps):
                row = _cell_trial(data, lr, step)
                if row is None:
                    labels[r][c] = "not run"
                elif row["state"] == "COMPLETE" and _is_number(row.get(metric)):
                    values[r, c] = float(row[metric])
                    labels[r][c] = f"{float(row[metric]):.3g}"
                else:
                    labels[r][c] = str(row["state"])
        fig, ax = plt.subplots(figsize=(max(8.0, 1.3 * len(steps) + 2.2), 0.8 * len(lrs) + 1.6))
        masked = np.ma.masked_invalid(values)
        cmap = plt.get_cmap("viridis").with_extremes(bad="#dee2e6")  # grey: no value (failed, pruned)
        image = ax.imshow(masked, cmap=cmap, aspect="auto")
        for r in range(len(lrs)):
            for c in range(len(steps)):
                ax.text(
                    c, r, labels[r][c], ha="center", va="center", fontsize=8, color=_text_colour(values, r, c)
                )
        ax.set_xticks(range(len(steps)), [str(s) for s in steps])
        ax.set_yticks(range(len(lrs)), [fmt_sci(lr) for lr in lrs])
        ax.set_xlabel("training steps")
        ax.set_ylabel("learning rate")
        base = data.baseline_metrics.get(metric)
        title = metric_names.label(metric)
        if metric_names.direction_words(metric):
            title += f" ({metric_names.direction_words(metric)})"
        if "warnings" in data.results and any(
            metric_names.warnings_for(metric, w) for w in data.results["warnings"].dropna()
        ):
            title += "  ⚠ small-sample warning (see the leaderboard)"
        ax.set_title(title + (f"  · baseline {fmt(base)}" if base is not None else ""), fontsize=10)
        fig.colorbar(image, ax=ax)
        fig.tight_layout()
        path = out_dir / f"heatmap_{metric.split('/', 1)[-1].replace('/', '_')}.png"
        fig.savefig(path, dpi=FIGURE_DPI)
        plt.close(fig)
        written.append(path)
    return written


def _text_colour(values, r: int, c: int) -> str:
    """Readable on viridis: white on the dark (low) half, black on the light half and on grey."""
    import numpy as np

    value = values[r, c]
    if np.isnan(value):
        return "black"
    low, high = np.nanmin(values), np.nanmax(values)
    return "white" if high == low or (value - low) / (high - low) < 0.6 else "black"


def _load_optuna_study(data: StudyData):
    """The study from the storage in study.json (optuna is imported only here, for the report's plots)."""
    import optuna

    from sdsweep.study_store import open_storage

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    url = data.info.get("storage") or f"sqlite:///{data.paths.storage_db.resolve()}"
    return optuna.load_study(study_name=data.info.get("study") or data.root.name, storage=open_storage(url))


def optuna_figures(data: StudyData, out_dir: Path, figures: Figures) -> None:
    """Optimization history and parameter importances, each skipped with a note when not meaningful."""
    try:
        study = _load_optuna_study(data)
        from optuna.trial import TrialState

        trials = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)) if t.values]
    except Exception as error:  # the storage may be on another machine; the files still make a report
        figures.notes["history"] = figures.notes["importances"] = (
            f"Optuna storage not readable ({type(error).__name__}: {error})"
        )
        return
    metric, direction = data.objective
    if len(trials) < MIN_TRIALS_FOR_HISTORY:
        figures.notes["history"] = (
            f"optimization history needs at least {MIN_TRIALS_FOR_HISTORY} complete trials ({len(trials)} so far)"
        )
    else:
        figures.history = _plot_history(trials, metric, direction, out_dir / "optimization_history.png")
    swept = sorted({k for t in trials for k in t.params})
    if len(swept) < MIN_PARAMS_FOR_IMPORTANCE or len(trials) < MIN_TRIALS_FOR_IMPORTANCE:
        figures.notes["importances"] = (
            f"parameter importances need at least {MIN_PARAMS_FOR_IMPORTANCE} swept parameters and "
            f"{MIN_TRIALS_FOR_IMPORTANCE} complete trials (have {len(swept)} and {len(trials)})"
        )
        return
    importances, how = _param_importances(study, direction)
    if importances is None:
        figures.notes["importances"] = how
        return
    figures.importance_values = importances
    figures.notes["importances"] = how
    figures.importances = _plot_importances(importances, metric, how, out_dir / "param_importances.png")


def _param_importances(study, direction: str) -> tuple[dict[str, float] | None, str]:
    """fANOVA (needs scikit-learn, often absent), else PED-ANOVA (numpy only), else a note."""
    import optuna

    sign = -1.0 if direction == "maximize" else 1.0

    def first_objective(trial):  # multi-objective studies: rank by the first objective
        return trial.values[0]

    def lower_is_better(trial):  # PED-ANOVA explains what makes the target *low*
        return sign * trial.values[0]

    candidates = [
        ("fANOVA", optuna.importance.FanovaImportanceEvaluator, first_objective),
        ("PED-ANOVA", optuna.importance.PedAnovaImportanceEvaluator, lower_is_better),
    ]
    failures = []
    for name, evaluator_cls, target in candidates:
        try:
            with warnings.catch_warnings():  # PED-ANOVA warns about the target sign, handled above
                warnings.filterwarnings("ignore", message=".*importances of params to achieve low.*")
                values = optuna.importance.get_param_importances(
                    study, evaluator=evaluator_cls(), target=target
                )
            fallback = f" ({'; '.join(failures)})" if failures else ""
            return {k: float(v) for k, v in values.items()}, f"importance evaluator: {name}{fallback}"
        except ImportError:  # fANOVA fits random forests with scikit-learn
            failures.append(f"{name} needs scikit-learn")
        except Exception as error:
            failures.append(f"{name} failed: {type(error).__name__}: {str(error)[:200]}")
    return None, "parameter importances could not be computed (" + "; ".join(failures) + ")"


def _plot_history(trials, metric: str, direction: str, out_png: Path) -> Path:
    plt = _pyplot()
    trials = sorted(trials, key=lambda t: t.number)
    numbers = [t.number for t in trials]
    values = [t.values[0] for t in trials]
    better = max if direction == "maximize" else min
    running = [better(values[: i + 1]) for i in range(len(values))]
    fig, ax = plt.subplots(figsize=(10, 4))
    ax.plot(numbers, values, "o", label="trial")
    ax.step(numbers, running, where="post", color="#e8590c", label=f"best so far ({direction})")
    ax.set_xlabel("trial")
    ax.set_ylabel(metric_names.label(metric))
    ax.set_title("Optimization history")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_png, dpi=FIGURE_DPI)
    plt.close(fig)
    return out_png


def _plot_importances(importances: dict[str, float], metric: str, how: str, out_png: Path) -> Path:
    plt = _pyplot()
    names = list(importances)[::-1]
    fig, ax = plt.subplots(figsize=(10, 0.5 * len(names) + 1.6))
    ax.barh(names, [importances[n] for n in names], color="#1971c2")
    ax.set_xlabel(f"importance for {metric_names.label(metric)}")
    # Only the evaluator's name: the fallback story is in the note under the figure, not a cut-off title.
    evaluator = how.removeprefix("importance evaluator: ").split(" (")[0]
    ax.set_title(f"Parameter importances ({evaluator})", fontsize=11)
    fig.tight_layout()
    fig.savefig(out_png, dpi=FIGURE_DPI)
    plt.close(fig)
    return out_png


def collect_grids(data: StudyData, files_dir: Path, figures: Figures) -> None:
    """Copy each trial's grid.png (and the baseline's) into report_files/ for the markdown links."""
    for trial in sorted(data.records):
        source = data.paths.trial(trial) / io.TRIAL_GRID
        if source.is_file():
            target = files_dir / f"trial_{trial:04d}_grid.png"
            shutil.copyfile(source, target)
            figures.trial_grids[trial] = target
    source = data.paths.baseline / io.TRIAL_GRID
    if source.is_file():
        figures.baseline_grid = Path(shutil.copyfile(source, files_dir / "baseline_grid.png"))


def make_figures(data: StudyData, files_dir: Path) -> Figures:
    files_dir.mkdir(parents=True, exist_ok=True)
    figures = Figures()
    sheet = contact_sheet(data, files_dir / "contact_sheet.png")
    if isinstance(sheet, str):
        figures.notes["contact_sheet"] = sheet
    else:
        figures.contact_sheet = sheet
    heatmaps = metric_heatmaps(data, files_dir)
    if isinstance(heatmaps, str):
        figures.notes["heatmaps"] = heatmaps
    else:
        figures.heatmaps = heatmaps
    optuna_figures(data, files_dir, figures)
    collect_grids(data, files_dir, figures)
    comparison_figures(data, files_dir, figures)
    return figures


def comparison_figures(data: StudyData, files_dir: Path, figures: Figures) -> None:
    """Pareto front (several objectives), per-method lr panels and contact sheets (several methods)."""
    from sdsweep import report_compare

    pareto = report_compare.pareto_plot(data, files_dir / "pareto_front.png", dpi=FIGURE_DPI)
    if isinstance(pareto, str):
        figures.notes["pareto"] = pareto
    else:
        figures.pareto = pareto
    panels = report_compare.lr_panels(data, files_dir / "lr_by_method.png", dpi=FIGURE_DPI)
    if isinstance(panels, str):
        figures.notes["lr_panels"] = panels
    else:
        figures.lr_panels = panels
    figures.method_sheets = report_compare.method_sheets(data, files_dir)


# ---- rendering ----------------------------------------------------------------------------------------


def _summary_lines(data: StudyData, board: Leaderboard) -> list[str]:
    metric, direction = data.objective
    states = data.results["state"].value_counts().to_dict() if not data.results.empty else {}
    lines = [
        f"Model: {data.info.get('model')} ({data.info.get('pretrained')}), method: {data.info.get('method')}",
        "Objective"
        + ("s" if len(data.objectives) > 1 else "")
        + ": "
        + ", ".join(f"{d} {metric_names.label(m)}" for m, d in data.objectives)
        + f"; constraints: {', '.join(data.info.get('constraints') or []) or 'none'}",
        "Trials: " + (", ".join(f"{n} {s}" for s, n in sorted(states.items())) or "none yet"),
    ]
    if board.best_trial is not None:
        record = data.records.get(board.best_trial)
        params = ", ".join(
            f"{short_label(k)}={fmt_param(k, v)}" for k, v in (record.params if record else {}).items()
        )
        values = ", ".join(
            f"{metric_names.label(m)} = {fmt((record.metrics if record else {}).get(m))}"
            for m, _ in data.objectives
        )
        rule = " (Pareto front member closest to the utopia point)" if len(data.objectives) > 1 else ""
        lines.append(f"Best feasible trial: {board.best_trial:04d} ({params}) with {values}{rule}")

    else:
        lines.append("Best feasible trial: none (no trial is COMPLETE and satisfies the constraints)")
    return lines


def _trial_caption(data: StudyData, trial: int) -> str:
    record = data.records.get(trial)
    params = " ".join(
        f"{short_label(k)}={fmt_param(k, v)}" for k, v in (record.params if record else {}).items()
    )
    return f"trial {trial:04d} · {record.state.value if record else None} · {params}".strip()


def _comparison(data: StudyData) -> Any:
    from sdsweep.report_compare import comparison_table

    metrics = metric_columns(data.results)
    first = [m for m, _ in data.objectives if m in metrics]
    return comparison_table(data, first + [m for m in metrics if m not in first])


def _grid_size(path: Path) -> tuple[int, int]:
    from PIL import Image

    with Image.open(path) as image:
        return image.size


def render_markdown(data: StudyData, board: Leaderboard, figures: Figures, md_path: Path) -> str:
    def link(path: Path) -> str:
        return os.path.relpath(path, md_path.parent).replace(os.sep, "/")

    def figure(path: Path | None, alt: str, note_key: str) -> str:
        # A linked image: a click opens the PNG at full size in any markdown viewer.
        return f"[![{alt}]({link(path)})]({link(path)})" if path else f"_{figures.notes.get(note_key)}_"

    out = [f"# Study report: {data.info.get('study', data.root.name)}", ""]
    out += [f"- {line}" for line in _summary_lines(data, board)] + ["", "## Leaderboard", ""]
    out.append(LEADERBOARD_NOTE)
    out.append("")
    out += _markdown_table(board.columns, board.rows, board.row_trials, board.best_trial)
    out += [""] + [f"- ⚠ **{column}**: {'; '.join(items)}" for column, items in board.warnings.items()]
    comparison = _comparison(data)
    out += ["", "## Comparison by model × method", "", COMPARISON_NOTE, ""]
    out += _markdown_table(comparison.columns, comparison.rows, [None] * len(comparison.rows), None)
    out += [f"_{n}_" for n in comparison.notes]
    if figures.pareto or len(data.objectives) > 1:
        out += ["", "## Pareto front", "", figure(figures.pareto, "Pareto front", "pareto")]
    if figures.lr_panels:
        out += ["", "## Learning rate by method", "", figure(figures.lr_panels, "lr by method", "lr_panels")]
    if len(figures.method_sheets) > 1:
        out += ["", "## Contact sheet per method", ""]
        out += [figure(p, p.stem, "") + "\n" for p in figures.method_sheets]
    out += ["", "## Contact sheet (learning rate × steps)", ""]
    out.append(figure(figures.contact_sheet, "contact sheet", "contact_sheet"))
    out += ["", "## Metric heatmaps", ""]
    out += [figure(p, p.stem, "") + "\n" for p in figures.heatmaps] or [f"_{figures.notes.get('heatmaps')}_"]
    out += ["", "## Optuna", ""]
    out.append(figure(figures.history, "optimization history", "history"))
    out.append("")
    if figures.importances:
        out.append(figure(figures.importances, "parameter importances", "importances"))
        out.append("")
        out.append(figures.notes.get("importances", ""))
    else:
        out.append(f"_{figures.notes.get('importances')}_")
    out += ["", "## Sample grids", ""]
    if figures.baseline_grid:
        out += ["### baseline (untuned)", "", figure(figures.baseline_grid, "baseline grid", ""), ""]
    for trial in sorted(data.records):
        out.append(f"### {_trial_caption(data, trial)}")
        out.append("")
        if trial in figures.trial_grids:
            out.append(figure(figures.trial_grids[trial], f"trial {trial} grid", ""))
        else:
            reason = data.records[trial].fail_reason or "no grid"
            out.append(f"_no images: {reason}_")
        out.append("")
    return "\n".join(out).rstrip() + "\n"


def _markdown_table(
    columns: list[str], rows: list[list[str]], row_trials: list[int | None], best: int | None
) -> list[str]:
    out = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for trial, cells in zip(row_trials, rows):
        shown = [c.replace("|", "\\|") for c in cells]
        if trial is not None and trial == best:
            shown = [f"**{c}**" if c else c for c in shown]
        out.append("| " + " | ".join(shown) + " |")
    return out


LEADERBOARD_NOTE = (
    "Metrics show the value and, in brackets, the change from the untuned baseline. "
    "↑: higher is better, ↓: lower is better. ⚠: a warning qualifies that number (listed under the table)."
)
COMPARISON_NOTE = (
    "One row per model × method: its best trial (the study's best-trial rule), with deltas against "
    "the untuned baseline of that row's own model."
)


def data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")


_CSS = """
body{font-family:system-ui,sans-serif;margin:2rem auto;padding:0 1rem;color:#212529;max-width:1200px}
table{border-collapse:collapse;font-size:13px}th,td{border:1px solid #ced4da;padding:4px 8px;text-align:right;
white-space:nowrap}
th{background:#f1f3f5}td:nth-child(3),td:last-child{text-align:left;white-space:normal}
.table-wrap{overflow-x:auto;max-width:100%}
tr.best td{background:#fff3bf;font-weight:600}tr.baseline td{background:#e7f5ff;font-style:italic}
tr.FAIL td{color:#c92a2a}tr.PRUNED td{color:#e67700}td.warn{background:#fff4e6}
img{border:1px solid #dee2e6;cursor:zoom-in;display:block}
img.figure{width:100%;height:auto;box-sizing:border-box}
img.grid{image-rendering:pixelated;max-width:100%;height:auto}
figure{margin:0 0 1.5rem 0}figcaption{font-size:13px;margin-top:4px}.note{color:#868e96;font-style:italic}
ul.warnings{color:#d9480f;font-size:13px}
#lightbox{display:none;position:fixed;inset:0;background:rgba(0,0,0,.85);overflow:auto;z-index:10;cursor:zoom-out}
#lightbox.open{display:block}#lightbox img{max-width:none;margin:2rem auto;border:0;cursor:zoom-out}
"""

# A click on any image shows it at its natural size over the page (scrollable); a click or Esc closes it.
_LIGHTBOX = """<div id="lightbox" title="click or Esc to close"><img alt="full size"></div>
<script>
(() => {
  const box = document.getElementById('lightbox'), big = box.querySelector('img');
  document.querySelectorAll('img.figure, img.grid').forEach(img => img.addEventListener('click', () => {
    big.src = img.src; big.style.width = img.naturalWidth + 'px'; box.classList.add('open');
  }));
  box.addEventListener('click', () => box.classList.remove('open'));
  document.addEventListener('keydown', e => { if (e.key === 'Escape') box.classList.remove('open'); });
})();
</script>"""


def _img(path: Path | None, alt: str, note: str | None) -> str:
    """A full-width figure (rendered at FIGURE_DPI, so full width is its natural scale)."""
    if path is None:
        return f'<p class="note">{html.escape(note or "not available")}</p>'
    return f'<figure><img class="figure" src="{data_uri(path)}" alt="{html.escape(alt)}"></figure>'


def _grid_img(path: Path, alt: str) -> str:
    """A sample grid at twice its pixel size (crisp, never shrunk below natural: labels stay legible)."""
    width, _ = _grid_size(path)
    return (
        f'<img class="grid" src="{data_uri(path)}" alt="{html.escape(alt)}" '
        f'style="width:min(100%, {2 * width}px)">'
    )


def _html_table(columns: list[str], rows: list[list[str]], classes: list[str], titles=None) -> str:
    esc = html.escape
    out = ["<div class='table-wrap'><table><thead><tr>"]
    out += [f"<th>{esc(c)}</th>" for c in columns]
    out.append("</tr></thead><tbody>")
    for r, (css, cells) in enumerate(zip(classes, rows)):
        out.append(f"<tr class='{esc(css)}'>")
        for c, cell in enumerate(cells):
            warning = (titles or {}).get((r, c))
            if warning:
                out.append(f"<td class='warn' title='{esc('; '.join(warning))}'>{esc(cell)}</td>")
            else:
                out.append(f"<td>{esc(cell)}</td>")
        out.append("</tr>")
    out.append("</tbody></table></div>")
    return "".join(out)


def render_html(data: StudyData, board: Leaderboard, figures: Figures) -> str:
    esc = html.escape
    title = f"Study report: {data.info.get('study', data.root.name)}"
    parts = [
        f"<!doctype html><html><head><meta charset='utf-8'><title>{esc(title)}</title><style>{_CSS}</style></head><body>"
    ]
    parts.append(
        f"<h1>{esc(title)}</h1><ul>"
        + "".join(f"<li>{esc(x)}</li>" for x in _summary_lines(data, board))
        + "</ul>"
    )
    parts.append(f"<h2>Leaderboard</h2><p>{esc(LEADERBOARD_NOTE)}</p>")
    classes = [
        "baseline" if trial is None else ("best" if trial == board.best_trial else cells[2])
        for trial, cells in zip(board.row_trials, board.rows)
    ]
    parts.append(_html_table(board.columns, board.rows, classes, board.cell_warnings))
    if board.warnings:
        parts.append(
            "<ul class='warnings'>"
            + "".join(
                f"<li>⚠ <b>{esc(column)}</b>: {esc('; '.join(items))}</li>"
                for column, items in board.warnings.items()
            )
            + "</ul>"
        )
    comparison = _comparison(data)
    parts.append(f"<h2>Comparison by model × method</h2><p>{esc(COMPARISON_NOTE)}</p>")
    parts.append(_html_table(comparison.columns, comparison.rows, [""] * len(comparison.rows)))
    parts += [f"<p class='note'>{esc(n)}</p>" for n in comparison.notes]
    if figures.pareto or len(data.objectives) > 1:
        parts.append("<h2>Pareto front</h2>")
        parts.append(_img(figures.pareto, "Pareto front", figures.notes.get("pareto")))
    if figures.lr_panels:
        parts.append("<h2>Learning rate by method</h2>" + _img(figures.lr_panels, "lr by method", None))
    if len(figures.method_sheets) > 1:
        parts.append("<h2>Contact sheet per method</h2>")
        parts += [_img(p, p.stem, None) for p in figures.method_sheets]
    parts.append("<h2>Contact sheet (learning rate × steps)</h2>")
    parts.append(_img(figures.contact_sheet, "contact sheet", figures.notes.get("contact_sheet")))
    parts.append("<h2>Metric heatmaps</h2>")
    parts += [_img(p, p.stem, None) for p in figures.heatmaps] or [
        _img(None, "", figures.notes.get("heatmaps"))
    ]
    parts.append("<h2>Optuna</h2>")
    parts.append(_img(figures.history, "optimization history", figures.notes.get("history")))
    parts.append(_img(figures.importances, "parameter importances", figures.notes.get("importances")))
    if figures.importances:
        parts.append(f"<p class='note'>{esc(figures.notes.get('importances', ''))}</p>")
    parts.append("<h2>Sample grids</h2>")
    if figures.baseline_grid:
        parts.append(
            f"<figure>{_grid_img(figures.baseline_grid, 'baseline grid')}<figcaption>baseline (untuned)</figcaption></figure>"
        )
    for trial in sorted(data.records):
        caption = esc(_trial_caption(data, trial))
        if trial in figures.trial_grids:
            body = _grid_img(figures.trial_grids[trial], f"trial {trial} grid")
        else:
            body = f"<p class='note'>no images: {esc(str(data.records[trial].fail_reason or 'no grid'))}</p>"
        parts.append(f"<figure>{body}<figcaption>{caption}</figcaption></figure>")
    parts.append(_LIGHTBOX + "</body></html>")
    return "\n".join(parts) + "\n"


def build_report(study_dir: Path, out_dir: Path | None = None) -> tuple[Path, Path]:
    """Write ``report.html`` (self-contained) and ``report.md`` (+ ``report_files/``); returns both paths."""
    data = load_study(study_dir)
    out_dir = Path(out_dir) if out_dir is not None else Path(study_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    html_path, md_path = out_dir / "report.html", out_dir / "report.md"
    files_dir = out_dir / FILES_DIR
    shutil.rmtree(files_dir, ignore_errors=True)  # no stale figures from an earlier, larger study
    figures = make_figures(data, files_dir)
    board = build_leaderboard(data)
    from sdsweep.report_protocols import protocol_sections  # held-out table, human ratings (issue 19)

    extra = protocol_sections(data.root, data.results, board.best_trial)
    page = render_html(data, board, figures).replace("</body></html>", extra.html + "</body></html>")
    io.atomic_write_text(html_path, page)
    io.atomic_write_text(md_path, render_markdown(data, board, figures, md_path) + extra.markdown)
    return html_path, md_path


def report_plots(out_dir: Path) -> dict[str, Path]:
    """The study-level figures of a built report (name -> PNG), for ``tracking.record_study(plots=...)``."""
    files_dir = Path(out_dir) / FILES_DIR
    names = ["contact_sheet.png", "optimization_history.png", "param_importances.png", "pareto_front.png"]
    names.append("lr_by_method.png")
    found = [files_dir / n for n in names] + sorted(files_dir.glob("heatmap_*.png"))
    found += sorted(files_dir.glob("method_sheet_*.png"))
    return {p.stem: p for p in found if p.is_file()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Build report.html and report.md for a sdsweep study folder."
    )
    parser.add_argument("study_dir", type=Path, help="experiments/<study>")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: the study folder)")
    args = parser.parse_args(argv)
    try:
        html_path, md_path = build_report(args.study_dir, args.out)
    except StudyFolderError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"report: {html_path}\nmarkdown: {md_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
