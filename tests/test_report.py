"""The local report, built from a real finished study (the session fixture ``finished_study``)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

from sdsweep import io
from sdsweep.results.report import LR_KEY, STEP_KEY, build_report, load_study, main, report_plots
from sdsweep.results.table import write_results


def copy_study(study: Path, tmp_path: Path) -> Path:
    target = tmp_path / study.name
    shutil.copytree(study, target, ignore=shutil.ignore_patterns("wandb", "report*"))
    return target


def rewrite_trial(study: Path, trial: int, **changes) -> None:
    """Edit one trial's record and rebuild results.csv from the records, as the sweep would."""
    path = io.StudyPaths(study).trial(trial) / io.TRIAL_METRICS
    record = io.read_json(path)
    record.update(changes)
    io.atomic_write_json(path, record)
    write_results(io.StudyPaths(study))


def img_sources(html_text: str) -> list[str]:
    return re.findall(r'<img[^>]*\ssrc="([^"]*)"', html_text)


@pytest.fixture
def report(finished_study, tmp_path):
    study = copy_study(finished_study, tmp_path)
    html_path, md_path = build_report(study)
    return study, html_path, md_path


def test_report_files_are_self_contained(report):
    study, html_path, md_path = report
    assert html_path == study / "report.html" and md_path == study / "report.md"
    sources = img_sources(html_path.read_text())
    assert sources, "the report shows images"
    assert all(s.startswith("data:image/png;base64,") for s in sources)  # works anywhere, no side files
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md_path.read_text())
    assert links and all(link.startswith("report_files/") for link in links)
    for link in links:
        with Image.open(md_path.parent / link) as image:
            assert image.width > 0 and image.height > 0


def test_leaderboard_is_sorted_by_the_objective_with_deltas(report):
    study, html_path, md_path = report
    info = json.loads((study / "study.json").read_text())
    metric, direction = info["objectives"][0]["metric"], info["objectives"][0]["direction"]
    results = pd.read_csv(study / "results.csv")
    complete = results[results["state"] == "COMPLETE"].sort_values(
        ["objective", "trial"], ascending=[direction == "minimize", True]
    )
    md = md_path.read_text()
    table_trials = [int(t) for t in re.findall(r"^\| (?:\*\*)?\d*(?:\*\*)? \| (?:\*\*)?(\d{4})", md, re.M)]
    assert table_trials[: len(complete)] == complete["trial"].tolist()
    assert sorted(table_trials) == sorted(results["trial"].tolist())  # every trial, failed ones too
    baseline = io.read_json(study / "baseline" / "metrics.json")["metrics"][metric]
    best = complete[complete["feasible"].fillna(True).astype(bool)].iloc[0]
    delta = best[metric] - baseline
    assert f"({delta:+.3g})" in md
    assert f"Best feasible trial: {int(best['trial']):04d}" in md
    assert "class='best'" in html_path.read_text()


def test_contact_sheet_and_heatmaps_cover_the_grid(report):
    study, _, md_path = report
    results = pd.read_csv(study / "results.csv")
    files = study / "report_files"
    with Image.open(files / "contact_sheet.png") as sheet:
        rows, cols = results[LR_KEY].nunique(), results[STEP_KEY].nunique() + 1  # + the baseline column
        assert sheet.width > 100 * cols * 0.9 and sheet.height > 100 * rows * 0.9
    metrics = [
        c
        for c in results.columns
        if c.startswith("eval/") and c.count("/") == 1 and not c.endswith("_reliable")
    ]
    assert not (files / "heatmap_fid_reliable.png").exists()  # a flag, not a metric
    for metric in metrics:
        assert (files / f"heatmap_{metric.split('/', 1)[1]}.png").is_file()
    plots = report_plots(study)
    assert plots["contact_sheet"] == files / "contact_sheet.png"
    assert {f"heatmap_{m.split('/', 1)[1]}" for m in metrics} <= set(plots)
    for trial_dir in io.StudyPaths(study).trial_dirs():
        if (trial_dir / io.TRIAL_GRID).is_file():
            assert (files / f"trial_{trial_dir.name}_grid.png").read_bytes() == (
                trial_dir / io.TRIAL_GRID
            ).read_bytes()


def test_optuna_sections_follow_the_number_of_complete_trials(report):
    study, _, md_path = report
    results = pd.read_csv(study / "results.csv")
    complete = int((results["state"] == "COMPLETE").sum())
    md = md_path.read_text()
    assert ((study / "report_files" / "optimization_history.png").is_file()) == (complete >= 2)
    if complete >= 4:
        assert (study / "report_files" / "param_importances.png").is_file()
        assert "importance evaluator:" in md
    else:
        assert "parameter importances need at least" in md


def test_report_with_failed_and_pruned_trials(finished_study, tmp_path):
    study = copy_study(finished_study, tmp_path)
    trials = [int(p.name) for p in io.StudyPaths(study).trial_dirs()]
    failed, pruned = trials[-1], trials[0]
    shutil.rmtree(io.StudyPaths(study).trial(failed) / io.TRIAL_SAMPLES, ignore_errors=True)
    (io.StudyPaths(study).trial(failed) / io.TRIAL_GRID).unlink(missing_ok=True)
    rewrite_trial(
        study,
        failed,
        state="FAIL",
        metrics={},
        delta={},
        objective=None,
        fail_reason="training diverged: NaN loss",
    )
    rewrite_trial(
        study, pruned, state="PRUNED", objective=None, fail_reason="pruned at step 2 by the median pruner"
    )
    html_path, md_path = build_report(study)
    md = md_path.read_text()
    assert "training diverged: NaN loss" in md and "pruned at step 2 by the median pruner" in md
    assert f"| {failed:04d} | FAIL |" in md
    assert "no images: training diverged" in md
    assert (study / "report_files" / "contact_sheet.png").is_file()
    loaded = load_study(study).results
    assert f"Best feasible trial: {failed:04d}" not in md and f"Best feasible trial: {pruned:04d}" not in md
    assert len(loaded) == len(trials)


def test_an_infeasible_trial_names_the_constraint_it_fails(finished_study, tmp_path):
    study = copy_study(finished_study, tmp_path)
    constraints = io.read_json(study / "study.json")["constraints"]
    assert "eval/appropriate_rate >= 0.75" in constraints
    trial = [int(p.name) for p in io.StudyPaths(study).trial_dirs()][-1]
    record = io.read_json(io.StudyPaths(study).trial(trial) / io.TRIAL_METRICS)
    rewrite_trial(  # as the sweep records a trial that fails the constraint
        study,
        trial,
        feasible=False,
        metrics={**record["metrics"], "eval/appropriate_rate": 0.5},
        violations={"eval/appropriate_rate >= 0.75": 0.25},
    )
    md = build_report(study)[1].read_text()
    row = next(line for line in md.splitlines() if line.startswith("|") and f"| {trial:04d} |" in line)
    assert row.endswith("| no | eval/appropriate_rate 0.5 fails >= 0.75 |"), row


def test_single_parameter_sweep_skips_the_grid_figures_with_a_note(finished_study, tmp_path):
    study = copy_study(finished_study, tmp_path)
    info = io.read_json(study / "study.json")
    info["params"] = [LR_KEY]
    io.atomic_write_json(study / "study.json", info)
    for trial_dir in io.StudyPaths(study).trial_dirs():
        record = io.read_json(trial_dir / io.TRIAL_METRICS)
        record["params"] = {LR_KEY: record["params"][LR_KEY]}
        io.atomic_write_json(trial_dir / io.TRIAL_METRICS, record)
    write_results(io.StudyPaths(study))
    _, md_path = build_report(study, tmp_path / "elsewhere")
    md = md_path.read_text()
    assert "no contact sheet: the study does not sweep both" in md
    assert "no heatmaps" in md
    assert not (tmp_path / "elsewhere" / "report_files" / "contact_sheet.png").exists()
    assert md_path == tmp_path / "elsewhere" / "report.md"


def test_cli_and_no_torch_import(finished_study, tmp_path, capsys):
    study = copy_study(finished_study, tmp_path)
    code = (
        "import sys; from sdsweep.results.report import main; rc = main([sys.argv[1]]);"
        "assert 'torch' not in sys.modules, 'report imported torch'; sys.exit(rc)"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, str(study)], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert f"report: {study / 'report.html'}" in done.stdout
    assert main([str(tmp_path / "missing")]) == 2
    assert "not a sdsweep study folder" in capsys.readouterr().err


def find_chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    return "/usr/bin/chromium" if Path("/usr/bin/chromium").is_file() else None


# Written into the page after every image has loaded (or failed): one line the test parses.
IMAGE_PROBE = """<script>
window.addEventListener('load', () => {
  const imgs = Array.from(document.images).filter(i => !i.closest('#lightbox'));
  const broken = imgs.filter(i => !(i.complete && i.naturalWidth > 0)).map(i => i.alt);
  const out = document.createElement('pre');
  out.id = 'image-probe';
  const content = document.querySelector('h1').getBoundingClientRect().width;
  const size = i => ({alt: i.alt, width: i.getBoundingClientRect().width, natural: i.naturalWidth});
  const figures = Array.from(document.querySelectorAll('img.figure')).map(size);
  const grids = Array.from(document.querySelectorAll('img.grid')).map(size);
  const first = document.querySelector('img.figure');
  first.click();  // the lightbox shows it at its natural size
  const box = document.getElementById('lightbox');
  const lightbox = {open: box.classList.contains('open'),
    width: box.querySelector('img').getBoundingClientRect().width, natural: first.naturalWidth};
  // Line boxes of each lr value's text: 1 when "1e-4" stays on one line, however tall its row is (a long
  // note in the same row makes every cell of the row taller, and that is no wrap).
  const lr = Array.from(document.querySelectorAll('td')).filter(td => /^1e-[0-9]$/.test(td.textContent))
    .map(td => td.querySelector('span').getClientRects().length);
  const row = document.querySelector('td').getBoundingClientRect().height;
  out.textContent = JSON.stringify({total: imgs.length, broken: broken,
    contact: imgs.filter(i => i.alt === 'contact sheet').map(i => i.naturalWidth),
    content, figures, grids, lightbox, lr, row});
  document.body.appendChild(out);
});
</script>"""


def test_report_renders_in_headless_chromium(report, tmp_path):
    chromium = find_chromium()
    if chromium is None:
        pytest.skip("chromium not found: install it with `apt-get install -y chromium` (see `make test`)")
    _, html_path, _ = report
    probe_page = tmp_path / "probe.html"
    probe_page.write_text(html_path.read_text().replace("</body>", IMAGE_PROBE + "</body>"))
    command = [
        chromium,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={tmp_path / 'profile'}",
        "--window-size=1400,1000",
        "--virtual-time-budget=10000",
        "--dump-dom",
        probe_page.as_uri(),
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    match = re.search(r'<pre id="image-probe">(.*?)</pre>', done.stdout, re.S)
    assert match, f"no probe output; chromium said: {done.stderr[-2000:]}"
    probe = json.loads(match.group(1).replace("&quot;", '"'))
    assert probe["total"] == len(img_sources(html_path.read_text()))
    assert probe["broken"] == []
    with Image.open(html_path.parent / "report_files" / "contact_sheet.png") as sheet:
        assert probe["contact"] == [sheet.width]
    # Readable: every figure fills at least 80% of the content width, sample grids are never shrunk
    # below their pixel size, a click opens the full-size image, and lr values do not wrap.
    names = {f["alt"] for f in probe["figures"]}
    assert {"contact sheet", "optimization history"} <= names and any(n.startswith("heatmap_") for n in names)
    for figure in probe["figures"]:
        assert figure["width"] >= 0.8 * probe["content"], figure
    assert probe["grids"] and all(g["width"] >= g["natural"] for g in probe["grids"]), probe["grids"]
    assert probe["lightbox"]["open"] and probe["lightbox"]["width"] == probe["lightbox"]["natural"]
    assert probe["lr"] and set(probe["lr"]) == {1}, probe["lr"]  # "1e-4" on one line


def test_metrics_read_with_direction_warnings_and_no_flags(report):
    study, html_path, md_path = report
    md, page = md_path.read_text(), html_path.read_text()
    assert "eval/clip_score ↑" in md and "eval/fd_clip ↓" in md and "eval/val_loss ↓" in md
    assert "fid_reliable" not in md and "fid_reliable" not in page
    results = pd.read_csv(study / "results.csv")
    fid_warned = results["warnings"].fillna("").str.contains("FD_CLIP on")
    if fid_warned.any():  # the tiny study evaluates 2 images: FID is flagged beside its number
        assert re.search(r"^- ⚠ \*\*eval/fd_clip ↓\*\*: FD_CLIP on \d+ images is unreliable", md, re.M)
        assert re.search(r"\| \d+(\.\d+)? \([+-][^)]*\) ⚠ \|", md)
        assert "class='warn' title='FD_CLIP on" in page
    assert "| 1e-4 |" in md and "| 1e-2 |" in md  # not 1e-04 or 0.0001
    assert "white-space:nowrap" in page


def test_comparison_table_uses_each_models_own_baseline(finished_study, tmp_path):
    study = copy_study(finished_study, tmp_path)
    paths = io.StudyPaths(study)
    record = io.read_json(paths.baseline / io.TRIAL_METRICS)
    record["metrics"]["eval/clip_score"] = 10.0  # a per-model baseline wins over baseline/metrics.json
    (paths.baseline / "tiny").mkdir()
    io.atomic_write_json(paths.baseline / "tiny" / io.TRIAL_METRICS, record)
    _, md_path = build_report(study)
    md = md_path.read_text()
    section = md.split("## Comparison by model × method")[1].split("##")[0]
    row = next(line for line in section.splitlines() if line.startswith("| tiny | full |"))
    results = pd.read_csv(study / "results.csv")
    best = results.sort_values(["objective", "trial"], ascending=[False, True]).iloc[0]
    assert f"| {int(best['trial']):04d} |" in row
    assert f"({best['eval/clip_score'] - 10.0:+.3g})" in row
    weights = paths.trial(int(best["trial"])) / "weights"
    size = sum(p.stat().st_size for p in weights.rglob("*") if p.is_file())
    assert (f"{size / 1024**2:.3g} MB" in row) or (f"{size / 1024:.3g} KB" in row)
    assert re.search(r"\| \d+ s \|", row)  # training time


def expected_compromise(results: pd.DataFrame, objectives: list[tuple[str, str]]) -> tuple[set[int], int]:
    """The documented rule, restated: Pareto front of COMPLETE feasible trials, then the member
    closest to the utopia point after min-max scaling each objective over the front."""
    done = results[results["state"] == "COMPLETE"]
    points = {
        int(r["trial"]): [r[m] if d == "maximize" else -r[m] for m, d in objectives]
        for _, r in done.iterrows()
    }
    front = {
        t
        for t, p in points.items()
        if not any(all(a >= b for a, b in zip(q, p)) and q != p for q in points.values())
    }
    lows = [min(points[t][i] for t in front) for i in range(len(objectives))]
    highs = [max(points[t][i] for t in front) for i in range(len(objectives))]

    def distance(t):
        return sum(
            ((highs[i] - points[t][i]) / (highs[i] - lows[i])) ** 2 if highs[i] > lows[i] else 0.0
            for i in range(len(objectives))
        )

    return front, min(sorted(front), key=distance)


def test_two_objective_report_shows_the_front_and_one_best(finished_study, tmp_path):
    """A two-objective study (the finished study's real trials judged on CLIP score and FID)."""
    from sdsweep.results.table import best_trial, pareto_front

    study = copy_study(finished_study, tmp_path)
    objectives = [("eval/clip_score", "maximize"), ("eval/fd_clip", "minimize")]
    info = io.read_json(study / "study.json")
    info["objectives"] = [{"metric": m, "direction": d} for m, d in objectives]
    io.atomic_write_json(study / "study.json", info)
    results = pd.read_csv(study / "results.csv")
    front, best = expected_compromise(results, objectives)
    assert set(pareto_front(results, objectives)) == front
    assert int(best_trial(results, objectives)["trial"]) == best
    assert best_trial(results, "maximize")["trial"] == best_trial(results, objectives[:1])["trial"]
    _, md_path = build_report(study)
    md = md_path.read_text()
    assert "## Pareto front" in md and "Objectives: maximize eval/clip_score ↑, minimize eval/fd_clip ↓" in md
    assert f"Best feasible trial: {best:04d}" in md and "closest to the utopia point" in md
    with Image.open(study / "report_files" / "pareto_front.png") as plot:
        assert plot.width >= 1200
    assert "pareto_front" in report_plots(study)


def test_metric_names_table():
    from sdsweep import metric_names as names

    assert names.label("eval/clip_score") == "eval/clip_score ↑"
    assert names.label("eval/fd_clip") == "eval/fd_clip ↓" and names.label("eval/kd_clip") == "eval/kd_clip ↓"
    assert (
        names.label("truth/count_ok") == "truth/count_ok ↑"
        and names.label("human/prefer") == "human/prefer ↑"
    )
    assert names.label("eval/brand_new") == "eval/brand_new"  # unknown: still shown, no arrow
    assert names.is_internal("eval/fid_reliable") and not names.is_internal("eval/fid")
    assert [names.fmt_number(v) for v in (1e-4, 3.2e-5, 56.6181, 4.0, None)] == [
        "1e-4",
        "3.2e-5",
        "56.62",
        "4",
        "–",
    ]
    joined = "FID on 8 images is unreliable (x=200); use it to rank trials.; KID subset size shrunk."
    assert names.warnings_for("eval/fid", joined) == [
        "FID on 8 images is unreliable (x=200); use it to rank trials."
    ]
    assert names.warnings_for("eval/kid", joined) == ["KID subset size shrunk."]
    assert names.warnings_for("eval/clip_score", joined) == []


def test_several_methods_get_their_own_lr_panels_rows_and_contact_sheets(finished_study, tmp_path):
    """Two trials relabelled as another method: each method keeps its own lr axis, row and sheet."""
    study = copy_study(finished_study, tmp_path)
    trials = sorted(int(p.name) for p in io.StudyPaths(study).trial_dirs())
    for trial in trials[:2]:
        rewrite_trial(study, trial, method="lora")
    _, md_path = build_report(study)
    md = md_path.read_text()
    section = md.split("## Comparison by model × method")[1].split("\n## ")[0]
    assert "| tiny | full |" in section and "| tiny | lora |" in section
    files = study / "report_files"
    assert {"method_sheet_full", "method_sheet_lora", "lr_by_method"} <= set(report_plots(study))
    with Image.open(files / "lr_by_method.png") as panels:
        assert panels.width >= 1200
    assert "## Learning rate by method" in md and "## Contact sheet per method" in md


def test_a_results_csv_from_before_wave_8_reads_with_one_name_per_quantity(tmp_path):
    """Old tables had ``learning_rate``/``max_train_steps`` (beside the config keys when swept, alone when
    not); readers see only ``method.learning_rate``/``train.max_train_steps``, filled from either."""
    from sdsweep import io
    from sdsweep.results.study_folder import read_results

    paths = io.StudyPaths(tmp_path / "old")
    paths.root.mkdir()
    pd.DataFrame(
        [
            {"trial": -1, "state": "BASELINE", "learning_rate": None, "max_train_steps": 0},
            {
                "trial": 0,
                "state": "COMPLETE",
                "learning_rate": 1e-4,
                "max_train_steps": 10,
                "method.learning_rate": 1e-4,
                "train.max_train_steps": 10,
            },
            {
                "trial": 1,
                "state": "COMPLETE",
                "learning_rate": 3e-4,
                "max_train_steps": 20,
                "method.learning_rate": None,
                "train.max_train_steps": None,
            },
        ]
    ).to_csv(paths.results_csv, index=False)
    frame = read_results(paths)
    assert "learning_rate" not in frame and "max_train_steps" not in frame
    assert frame["method.learning_rate"].tolist() == [1e-4, 3e-4]
    assert frame["train.max_train_steps"].tolist() == [10, 20]
