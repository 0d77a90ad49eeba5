"""The local report of a finished (or partly finished) study: ``report.html`` and ``report.md``.

``python -m sdsweep.report experiments/<study> [--out DIR]``

Reads only the study folder (``study.json``, ``results.csv``, ``baseline/``, ``trials/*``) and the
Optuna storage named in ``study.json``; never imports torch, so it runs anywhere the folder is copied.
The HTML embeds every image as a base64 data URI (one file that works offline, attached to an
e-mail, ...); the markdown links the PNGs written to ``report_files/`` beside it.

Modules: ``study_folder`` reads the study, ``report_leaderboard`` ranks it, ``report_figures`` draws,
``report_render`` walks the sections once for both pages; this module writes the files.

Failed and pruned trials have no metrics: they stay in the leaderboard with their reason, show as
labelled grey cells in the contact sheet and heatmaps, and never count as the best trial.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from sdsweep import io

# Re-exported: callers and tests import these names from the report.
from sdsweep.metric_names import LR_KEY, STEP_KEY  # noqa: F401
from sdsweep.results.figures import contact_sheet, make_figures  # noqa: F401
from sdsweep.results.leaderboard import Leaderboard, build_leaderboard  # noqa: F401
from sdsweep.results.render import render_html, render_markdown
from sdsweep.results.study_folder import StudyData, StudyFolderError, first_sample_name, load_study  # noqa: F401

FILES_DIR = "report_files"


def build_report(study_dir: Path, out_dir: Path | None = None) -> tuple[Path, Path]:
    """Write ``report.html`` (self-contained) and ``report.md`` (+ ``report_files/``); returns both paths."""
    data = load_study(study_dir)
    out_dir = Path(out_dir) if out_dir is not None else Path(study_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    target = io.StudyPaths(out_dir)  # the study folder's layout, also for a report written elsewhere
    html_path, md_path = target.report_html, target.report_md
    files_dir = out_dir / FILES_DIR
    shutil.rmtree(files_dir, ignore_errors=True)  # no stale figures from an earlier, larger study
    figures = make_figures(data, files_dir)
    board = build_leaderboard(data)
    from sdsweep.results.protocols import protocol_sections  # held-out table, human ratings (issue 19)

    extra = protocol_sections(data.root, data.results, board.best_trial)
    page = render_html(data, board, figures).replace("</body></html>", extra.html + "</body></html>")
    io.atomic_write_text(html_path, page)
    io.atomic_write_text(md_path, render_markdown(data, board, figures, md_path) + extra.markdown)
    return html_path, md_path


def report_plots(out_dir: Path) -> dict[str, Path]:
    """The study-level figures of a built report (name -> PNG), for ``tracking.record_study(plots=...)``."""
    files_dir = Path(out_dir) / FILES_DIR
    names = ["contact_sheet.png", "optimization_history.png", "param_importances.png", "pareto_front.png"]
    names += ["lr_by_method.png", "val_loss_bands.png"]
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
