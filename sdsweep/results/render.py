"""The report's pages: one walk over the sections (``sections``), two renderers (markdown, HTML).

``sections`` decides what the report says and in which order; ``render_markdown`` and ``render_html``
only decide how a block looks, so the two pages cannot drift apart.
"""

from __future__ import annotations

import base64
import html
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

from sdsweep import metric_names
from sdsweep.evaluation.units import read_units_or_none
from sdsweep.metric_names import fmt, fmt_param, metric_columns, short_label
from sdsweep.results.figures import Figures
from sdsweep.results.leaderboard import Leaderboard
from sdsweep.results.study_folder import StudyData
from sdsweep.results.verdict import noise_statement


# ---- blocks ---------------------------------------------------------------------------------------------
@dataclass
class Heading:
    text: str
    level: int = 2


@dataclass
class Bullets:
    items: list[str]


@dataclass
class Warnings:
    by_column: dict[str, list[str]]  # column label -> warnings on its numbers


@dataclass
class Text:
    text: str
    note: bool = False  # a muted, italic remark


@dataclass
class Table:
    columns: list[str]
    rows: list[list[str]]
    row_trials: list[int | None]
    best: int | None = None
    classes: list[str] = field(default_factory=list)  # one CSS class per row (HTML)
    cell_warnings: dict[tuple[int, int], list[str]] = field(default_factory=dict)


@dataclass
class Figure:
    path: Path | None
    alt: str
    note: str | None = None  # shown instead when there is no figure


@dataclass
class Grid:
    """A sample grid with its caption, or why the trial has none."""

    path: Path | None
    caption: str
    missing: str = ""


Block = Union[Heading, Bullets, Warnings, Text, Table, Figure, Grid]


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
    best = data.best()
    if best is not None and best.get("replicates"):
        lines.append(
            f"Replicates: the pick is configuration mean {fmt(best['replicate_mean'])} over "
            f"{best['replicates']} training seeds (sd {fmt(best['replicate_sd'])}, 95% interval "
            f"[{fmt(best['replicate_lo'])}, {fmt(best['replicate_hi'])}]; trials {best['replicate_trials']})"
        )
    noise = noise_statement(read_units_or_none(data.paths.baseline), metric, direction)
    if noise:
        lines.append(f"Noise: {noise}")
    if board.verdict is not None and board.verdict.best is not None:
        lines.append(f"Verdict: {board.verdict.sentence()}")
        if board.verdict.uncertain_sentence():
            lines.append(board.verdict.uncertain_sentence())
        lines.append(VERDICT_RULE)
    return lines


# The one rule, stated where the reader meets the verdict (sdsweep.results.verdict has the long form).
VERDICT_RULE = (
    "How the verdict is reached: every trial is evaluated on the same prompts and seeds (units), so each "
    "candidate is compared with the best unit by unit; it is not separable when the 95% bootstrap interval "
    "of that paired difference includes 0. ± is the half-width of a metric's 95% interval (bootstrap over "
    "units, stratified by prompt; Wilson for rates). A constraint is uncertain when the interval straddles "
    "its threshold; the pick uses point estimates, and `python -m sdsweep.confirm <study>` re-evaluates the "
    "contenders with fresh seeds until the best is separated or the image budget is spent."
)


def _trial_caption(data: StudyData, trial: int) -> str:
    record = data.records.get(trial)
    params = " ".join(
        f"{short_label(k)}={fmt_param(k, v)}" for k, v in (record.params if record else {}).items()
    )
    return f"trial {trial:04d} · {record.state.value if record else None} · {params}".strip()


def _comparison(data: StudyData) -> Any:
    from sdsweep.results.compare import comparison_table

    metrics = metric_columns(data.results)
    first = [m for m, _ in data.objectives if m in metrics]
    return comparison_table(data, first + [m for m in metrics if m not in first])


def _grid_size(path: Path) -> tuple[int, int]:
    from PIL import Image

    with Image.open(path) as image:
        return image.size


def sections(data: StudyData, board: Leaderboard, figures: Figures) -> list[Block]:
    """Everything the report shows, in order; both renderers walk this list."""
    notes = figures.notes
    out: list[Block] = [Heading(f"Study report: {data.info.get('study', data.root.name)}", 1)]
    out.append(Bullets(_summary_lines(data, board)))
    out += [Heading("Leaderboard"), Text(LEADERBOARD_NOTE)]
    classes = [
        "baseline" if trial is None else ("best" if trial == board.best_trial else cells[2])
        for trial, cells in zip(board.row_trials, board.rows)
    ]
    out.append(
        Table(board.columns, board.rows, board.row_trials, board.best_trial, classes, board.cell_warnings)
    )
    out.append(Warnings(board.warnings))
    comparison = _comparison(data)
    out += [Heading("Comparison by model × method"), Text(COMPARISON_NOTE)]
    out.append(
        Table(
            comparison.columns,
            comparison.rows,
            [None] * len(comparison.rows),
            None,
            [""] * len(comparison.rows),
        )
    )
    out += [Text(n, note=True) for n in comparison.notes]
    if figures.pareto or len(data.objectives) > 1:
        out += [Heading("Pareto front"), Figure(figures.pareto, "Pareto front", notes.get("pareto"))]
    if figures.lr_panels:
        out += [Heading("Learning rate by method"), Figure(figures.lr_panels, "lr by method")]
    if len(figures.method_sheets) > 1:
        out.append(Heading("Contact sheet per method"))
        out += [Figure(p, p.stem) for p in figures.method_sheets]
    out.append(Heading("Contact sheet (learning rate × steps)"))
    out.append(Figure(figures.contact_sheet, "contact sheet", notes.get("contact_sheet")))
    out.append(Heading("Metric heatmaps"))
    out += [Figure(p, p.stem) for p in figures.heatmaps] or [Figure(None, "", notes.get("heatmaps"))]
    if figures.val_loss_bands:
        out.append(Heading("Validation loss by noise level"))
        out.append(Figure(figures.val_loss_bands, "validation loss by timestep band"))
    out.append(Heading("Optuna"))
    out.append(Figure(figures.history, "optimization history", notes.get("history")))
    out.append(Figure(figures.importances, "parameter importances", notes.get("importances")))
    if figures.importances:
        out.append(Text(notes.get("importances", ""), note=True))
    out.append(Heading("Sample grids"))
    if figures.baseline_grid:
        out.append(Grid(figures.baseline_grid, "baseline (untuned)"))
    for trial in sorted(data.records):
        reason = data.records[trial].fail_reason or "no grid"
        out.append(Grid(figures.trial_grids.get(trial), _trial_caption(data, trial), f"no images: {reason}"))
    return out


# ---- markdown -------------------------------------------------------------------------------------------
def render_markdown(data: StudyData, board: Leaderboard, figures: Figures, md_path: Path) -> str:
    def link(path: Path) -> str:
        return os.path.relpath(path, md_path.parent).replace(os.sep, "/")

    def figure(path: Path | None, alt: str, note: str | None) -> str:
        # A linked image: a click opens the PNG at full size in any markdown viewer.
        return f"[![{alt}]({link(path)})]({link(path)})" if path else f"_{note}_"

    out: list[str] = []
    for block in sections(data, board, figures):
        if isinstance(block, Heading):
            out += ([""] if out else []) + ["#" * block.level + " " + block.text, ""]
        elif isinstance(block, Bullets):
            out += [f"- {line}" for line in block.items]
        elif isinstance(block, Warnings):
            out += [""] + [
                f"- ⚠ **{column}**: {'; '.join(items)}" for column, items in block.by_column.items()
            ]
        elif isinstance(block, Text):
            out += [f"_{block.text}_" if block.note else block.text, ""]
        elif isinstance(block, Table):
            out += _markdown_table(block.columns, block.rows, block.row_trials, block.best)
        elif isinstance(block, Figure):
            out += [figure(block.path, block.alt, block.note), ""]
        elif isinstance(block, Grid):
            body = figure(block.path, block.caption, None) if block.path else f"_{block.missing}_"
            out += [f"### {block.caption}", "", body, ""]
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
    "Metrics show the value, ± the half-width of its 95% interval (over the trial's evaluation units; "
    "a metric without one, such as a Fréchet distance, is one statistic of the whole image set), and, in "
    "brackets, the change from the untuned baseline. units: images (or held-out captions) behind the "
    "objective, more for trials a confirmation round re-evaluated. "
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
table{border-collapse:collapse;font-size:12px}th,td{border:1px solid #ced4da;padding:3px 6px;text-align:right}
th{background:#f1f3f5;vertical-align:bottom}td:nth-child(3),td:last-child{text-align:left}
.nw{white-space:nowrap}
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


# Tables fit the content width (#32.6): a header may break after "/" or "_" (eval/<wbr>prior_<wbr>clip_score),
# a cell only between its words ("45.07" | "(+15.9)" | "⚠"), so a number such as 1e-4 never splits.
def _breakable(label: str) -> str:
    return re.sub(r"([/_])", r"\1<wbr>", html.escape(label))


def _unbroken(cell: str) -> str:
    return " ".join(f"<span class='nw'>{html.escape(word)}</span>" for word in cell.split(" ") if word)


def _html_table(columns: list[str], rows: list[list[str]], classes: list[str], titles=None) -> str:
    esc = html.escape
    out = ["<div class='table-wrap'><table><thead><tr>"]
    out += [f"<th>{_breakable(c)}</th>" for c in columns]
    out.append("</tr></thead><tbody>")
    for r, (css, cells) in enumerate(zip(classes, rows)):
        out.append(f"<tr class='{esc(css)}'>")
        for c, cell in enumerate(cells):
            warning = (titles or {}).get((r, c))
            if warning:
                out.append(f"<td class='warn' title='{esc('; '.join(warning))}'>{_unbroken(cell)}</td>")
            else:
                out.append(f"<td>{_unbroken(cell)}</td>")
        out.append("</tr>")
    out.append("</tbody></table></div>")
    return "".join(out)


def render_html(data: StudyData, board: Leaderboard, figures: Figures) -> str:
    esc = html.escape
    title = f"Study report: {data.info.get('study', data.root.name)}"
    parts = [
        f"<!doctype html><html><head><meta charset='utf-8'><title>{esc(title)}</title><style>{_CSS}</style></head><body>"
    ]
    for block in sections(data, board, figures):
        if isinstance(block, Heading):
            parts.append(f"<h{block.level}>{esc(block.text)}</h{block.level}>")
        elif isinstance(block, Bullets):
            parts.append("<ul>" + "".join(f"<li>{esc(x)}</li>" for x in block.items) + "</ul>")
        elif isinstance(block, Warnings) and block.by_column:
            items = "".join(
                f"<li>⚠ <b>{esc(column)}</b>: {esc('; '.join(found))}</li>"
                for column, found in block.by_column.items()
            )
            parts.append(f"<ul class='warnings'>{items}</ul>")
        elif isinstance(block, Text):
            parts.append(
                f"<p class='note'>{esc(block.text)}</p>" if block.note else f"<p>{esc(block.text)}</p>"
            )
        elif isinstance(block, Table):
            parts.append(_html_table(block.columns, block.rows, block.classes, block.cell_warnings))
        elif isinstance(block, Figure):
            parts.append(_img(block.path, block.alt, block.note))
        elif isinstance(block, Grid):
            if block.path:
                body = _grid_img(block.path, block.caption)
            else:
                body = f"<p class='note'>{esc(block.missing)}</p>"
            parts.append(f"<figure>{body}<figcaption>{esc(block.caption)}</figcaption></figure>")
    parts.append(_LIGHTBOX + "</body></html>")
    return "\n".join(parts) + "\n"
