"""Report sections for the evaluation protocols: the held-out test-set table and the human ratings.

Each function returns a markdown and an HTML fragment (empty strings when the study has nothing to show),
so ``sdsweep.results.report`` only appends them.
"""

from __future__ import annotations

import base64
import html
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from sdsweep import io
from sdsweep.evaluation import ratings
from sdsweep.evaluation.protocol_files import HELDOUT_TABLE
from sdsweep.results.study_folder import read_baseline_metrics

HUMAN_COLUMNS = [
    "human/appropriate_rate",
    "human/appropriate_n",
    "human/quality",
    "human/quality_n",
    "human/raters",
    "human/auto_agreement",
    "eval/appropriate_rate",
]
THUMB_PX = 96


@dataclass
class Section:
    markdown: str = ""
    html: str = ""


def _fmt(value) -> str:
    if value is None or (isinstance(value, float) and pd.isna(value)):
        return "-"
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def _thumb(path: Path) -> str:
    if not path.exists():
        return "-"
    data = base64.b64encode(path.read_bytes()).decode()
    return f'<img src="data:image/png;base64,{data}" width="{THUMB_PX}" style="image-rendering:pixelated">'


def human_section(study_dir: str | Path, results: pd.DataFrame | None = None) -> Section:
    """human/* per trial (with counts) beside eval/appropriate_rate, and their agreement."""
    study_dir = Path(study_dir)
    human = ratings.human_metrics(study_dir)
    if human.empty:
        return Section()
    automatic = (
        results[["trial", "eval/appropriate_rate"]]
        if results is not None and "eval/appropriate_rate" in results.columns
        else pd.DataFrame(columns=["trial", "eval/appropriate_rate"])
    )
    baseline = read_baseline_metrics(study_dir)
    if "eval/appropriate_rate" in baseline and -1 not in set(automatic["trial"]):
        row = pd.DataFrame([{"trial": -1, "eval/appropriate_rate": baseline["eval/appropriate_rate"]}])
        automatic = pd.concat([row, automatic], ignore_index=True) if len(automatic) else row
    table = human.merge(automatic.astype({"trial": int}), on="trial", how="left")
    columns = ["trial"] + [c for c in HUMAN_COLUMNS if c in table.columns]
    rows = [
        [("baseline" if r["trial"] == -1 else str(r["trial"]))] + [_fmt(r[c]) for c in columns[1:]]
        for _, r in table.iterrows()
    ]
    correlation = ratings.agreement_across_trials(table)
    note = (
        f"Correlation of human/appropriate_rate with eval/appropriate_rate across trials: {correlation:.2f}."
        if correlation is not None
        else "Too few trials with both human and automatic rates (or no spread) for a correlation."
    )
    explain = (
        "Blind ratings from `ratings.csv` (`python -m sdsweep.rate`). human/auto_agreement: share of rated "
        "images where the person agrees with the automatic per-image degeneracy check."
    )
    md = ["## Human ratings", "", explain, "", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    md += ["| " + " | ".join(row) + " |" for row in rows]
    md += ["", note, ""]
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(v)}</td>" for v in row) + "</tr>" for row in rows)
    page = (
        f"<h2>Human ratings</h2><p>{html.escape(explain)}</p>"
        f"<table><tr>{head}</tr>{body}</table><p>{html.escape(note)}</p>"
    )
    return Section("\n".join(md), page)


def heldout_section(study_dir: str | Path, best_trial: int | None) -> Section:
    """The test-set table: caption, ground truth, baseline, best trial, LPIPS of each (per row)."""
    paths = io.StudyPaths(Path(study_dir))
    baseline = io.read_json(paths.baseline / HELDOUT_TABLE, {}) or {}
    best_dir = paths.trial(best_trial) if best_trial is not None else None
    best = (io.read_json(best_dir / HELDOUT_TABLE, {}) or {}) if best_dir else {}
    rows_base, rows_best = baseline.get("rows") or [], best.get("rows") or []
    if not rows_base and not rows_best:
        return Section()
    keys = sorted({k for row in rows_base + rows_best for k in row if k.startswith("eval/lpips")})
    lpips = keys[0] if keys else None
    count = max(len(rows_base), len(rows_best))
    title = f"## Held-out captions: ground truth, baseline and best trial ({best_trial})"
    header = ["caption", "ground truth", "baseline", f"{lpips} baseline", "best trial", f"{lpips} best"]
    md = [title, "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    cells_html = []
    for index in range(count):
        base = rows_base[index] if index < len(rows_base) else {}
        mine = rows_best[index] if index < len(rows_best) else {}
        caption = base.get("caption") or mine.get("caption") or ""
        truth = base.get("truth") or mine.get("truth")
        md.append(
            "| "
            + " | ".join(
                [
                    caption.replace("|", "/"),
                    f"![]({truth})" if truth else "-",
                    f"![](baseline/{base['sample']})" if base else "-",
                    _fmt(base.get(lpips)),
                    f"![](trials/{best_dir.name}/{mine['sample']})" if mine and best_dir else "-",
                    _fmt(mine.get(lpips)),
                ]
            )
            + " |"
        )
        cells = [
            html.escape(caption),
            _thumb(paths.root / truth) if truth else "-",
            _thumb(paths.baseline / base["sample"]) if base else "-",
            _fmt(base.get(lpips)),
            _thumb(best_dir / mine["sample"]) if mine and best_dir else "-",
            _fmt(mine.get(lpips)),
        ]
        cells_html.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    page = f"<h2>{html.escape(title[3:])}</h2><table><tr>{head}</tr>{''.join(cells_html)}</table>"
    return Section("\n".join(md) + "\n", page)


def protocol_sections(study_dir: str | Path, results: pd.DataFrame | None, best_trial: int | None) -> Section:
    """Both sections, concatenated: what ``sdsweep.results.report`` appends to report.md and report.html."""
    parts = [heldout_section(study_dir, best_trial), human_section(study_dir, results)]
    return Section("\n".join(p.markdown for p in parts if p.markdown), "".join(p.html for p in parts))
