"""The report's figures (matplotlib, Agg): contact sheet, metric heatmaps, Optuna plots, sample grids.

Each figure is a PNG under ``report_files/``, or a note saying why it was skipped; ``Figures`` holds
both. Rendering (HTML, markdown) lives in ``report_render``; this module never writes a page.
"""

from __future__ import annotations

import shutil
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from sdsweep import io, metric_names
from sdsweep.metric_names import LR_KEY, STEP_KEY, fmt, fmt_sci, metric_columns
from sdsweep.results.study_folder import StudyData, best_feasible_trial, first_sample_name, is_number
from sdsweep.results.table import is_feasible
from sdsweep.study.record import TrialState

# Importances need a few points per parameter to mean anything.
MIN_TRIALS_FOR_IMPORTANCE = 4
MIN_PARAMS_FOR_IMPORTANCE = 2
MIN_TRIALS_FOR_HISTORY = 2
# 200 dpi: a 6-inch figure is 1200 px, the page's content width, so text stays sharp when shown full width.
FIGURE_DPI = 200
_STATE_COLOURS = {
    TrialState.COMPLETE.value: "#2b8a3e",
    TrialState.PRUNED.value: "#e67700",
    TrialState.FAIL.value: "#c92a2a",
}
_is_number = is_number


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
    val_loss_bands: Path | None = None  # eval/val_loss/t<lo>-<hi>: baseline vs. best vs. one more trial
    notes: dict[str, str] = field(default_factory=dict)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # headless: no display on servers or in CI
    import matplotlib.pyplot as plt

    return plt


def _grid_axes(data: StudyData) -> tuple[list[float], list[int]] | None:
    """The lr and step values of an lr x steps sweep, or None when the study is not such a grid."""
    frame = data.results
    # Every table has both columns (one name per quantity); a grid is a study that sweeps both.
    if frame.empty or not {LR_KEY, STEP_KEY} <= set(data.params) or not {LR_KEY, STEP_KEY} <= set(frame):
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
    complete = match[match["state"] == TrialState.COMPLETE.value]
    return (complete if not complete.empty else match).iloc[-1]


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
                if state == TrialState.COMPLETE.value and not is_feasible(row.get("feasible")):
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
                elif row["state"] == TrialState.COMPLETE.value and _is_number(row.get(metric)):
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

    from sdsweep.study.store import open_storage

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
    from sdsweep.results.band_figure import val_loss_band_plot

    bands = val_loss_band_plot(data, files_dir / "val_loss_bands.png", dpi=FIGURE_DPI)
    if isinstance(bands, str):
        figures.notes["val_loss_bands"] = bands
    else:
        figures.val_loss_bands = bands
    return figures


def comparison_figures(data: StudyData, files_dir: Path, figures: Figures) -> None:
    """Pareto front (several objectives), per-method lr panels and contact sheets (several methods)."""
    from sdsweep.results import compare as report_compare

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
