"""A study is what it contains, not where it lives (issue #31): real finished studies, the real CLI.

Every sweep here is ``python -m sdsweep`` in a subprocess on the tiny model, as a user types it; the study
folder is then reached through another spelling of its path, a symlink, after a move, from two drivers
that see it through two paths, and with its data copied elsewhere. Location never changes the study;
content (one caption) does.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pandas as pd
import pytest
import yaml
from conftest import REPO, TINY_OVERRIDES
from PIL import Image

from sdsweep.sweep.fingerprint import RESET_MARKER_ENV

pytestmark = pytest.mark.slow

GRID = {(1e-4, 2), (1e-2, 2)}
STUDY_OVERRIDES = TINY_OVERRIDES + [
    "eval.metrics=[clip_score,appropriate_rate,val_loss]",
    "eval.prompts=[a photo of sks]",
    "+sweep=lr_steps",
    "sweep.learning_rates=[1e-4,1e-2]",
    "sweep.steps=[2]",
    "sweep.keep_best_k=-1",
    "sweep.isolation=inprocess",
    "tracking=none",
    "study=port",
]


def make_dataset(folder: Path, count: int = 4) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(count):
        Image.new("RGB", (32, 32), (50 * i, 120, 200)).save(folder / f"{i}.png")
        rows.append({"file_name": f"{i}.png", "text": f"a photo of sks number {i}"})
    (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def sdsweep(*args: str, cwd: Path, module: str = "sdsweep") -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    env.pop(RESET_MARKER_ENV, None)
    return subprocess.run(
        [sys.executable, "-m", module, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=900
    )


def ok(result: subprocess.CompletedProcess) -> str:
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    assert "Traceback" not in output, output[-4000:]
    return output


def trained_points(study: Path) -> Counter:
    """Trial folders a run wrote (config.yaml when it starts), per grid point: a retrained point counts 2."""
    counts: Counter = Counter()
    for config in study.glob("trials/*/config.yaml"):
        resolved = yaml.safe_load(config.read_text())
        counts[(float(resolved["method"]["learning_rate"]), int(resolved["train"]["max_train_steps"]))] += 1
    return counts


def assert_resumed_without_training(output: str, study: Path) -> None:
    assert "grid finished: all 2 grid points have results; nothing to run" in output, output[-3000:]
    assert trained_points(study) == Counter(dict.fromkeys(GRID, 1))


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished two-point study, run from its parent folder with a relative paths.root, and its data."""
    home = tmp_path_factory.mktemp("portable")
    data = make_dataset(home / "data")
    overrides = STUDY_OVERRIDES + ["data=imagefolder", f"data.path={data}", "data.num_heldout=1"]
    ok(sdsweep(*overrides, "paths.root=experiments", cwd=home))
    study = home / "experiments" / "port"
    assert trained_points(study) == Counter(dict.fromkeys(GRID, 1))
    return home, overrides


@pytest.fixture
def study_copy(finished, tmp_path):
    """A private copy of the finished study (and its data) under tmp_path/home, same layout."""
    home, overrides = finished
    copy = tmp_path / "home"
    shutil.copytree(home, copy, symlinks=True)
    data = copy / "data"
    overrides = [f"data.path={data}" if o.startswith("data.path=") else o for o in overrides]
    return copy, overrides


def test_resume_through_an_absolute_a_relative_path_and_a_symlink(study_copy, tmp_path):
    home, overrides = study_copy
    study = home / "experiments" / "port"
    # Absolute spelling of the same folder, from another working directory.
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    assert_resumed_without_training(
        ok(sdsweep(*overrides, f"paths.root={home / 'experiments'}", cwd=elsewhere)), study
    )
    # A relative path that climbs out of that other directory.
    relative = os.path.relpath(home / "experiments", elsewhere)
    assert relative.startswith("..")
    assert_resumed_without_training(ok(sdsweep(*overrides, f"paths.root={relative}", cwd=elsewhere)), study)
    # A symlink to the folder that holds the study.
    (tmp_path / "link").symlink_to(home / "experiments", target_is_directory=True)
    output = ok(sdsweep(*overrides, f"paths.root={tmp_path / 'link'}", cwd=elsewhere))
    assert_resumed_without_training(output, study)
    assert "holds results of a different setup" not in output
    info = json.loads((study / "study.json").read_text())
    assert "paths.root" not in info["fingerprint"]["settings"]
    assert not any(o.startswith("paths.root=") for o in info["overrides"])
    assert str(tmp_path) not in json.dumps(info["fingerprint"])  # identity holds content, no location


def test_a_moved_study_resumes_reports_exports_and_generates(study_copy, tmp_path):
    home, overrides = study_copy
    moved_root = tmp_path / "bigger-disk" / "experiments"
    moved_root.parent.mkdir()
    shutil.move(str(home / "experiments"), str(moved_root))
    study = moved_root / "port"
    # Nothing inside the folder points at where it was: trial records, results.csv, the storage's attributes.
    results = pd.read_csv(study / "results.csv")
    assert set(results["trial_dir"]) == {f"trials/{n:04d}" for n in results["trial"]}
    assert set(results["weights_dir"]) == {f"trials/{n:04d}/weights" for n in results["trial"]}
    for name in ("study.json", "results.csv", "report.md"):
        assert str(home) not in (study / name).read_text(), name
    for record in study.glob("trials/*/metrics.json"):
        assert str(home) not in record.read_text()

    output = ok(sdsweep(*overrides, f"paths.root={moved_root}", cwd=tmp_path))
    assert_resumed_without_training(output, study)
    assert f"weights: {study}/trials/" in output  # the message names where the weights are now

    import optuna

    attrs = [
        t.user_attrs["trial_dir"]
        for t in optuna.load_study(study_name="port", storage=f"sqlite:///{study / 'study.db'}").trials
    ]
    assert sorted(attrs) == [f"trials/{n:04d}" for n in range(len(attrs))]

    report = ok(sdsweep(str(study), cwd=tmp_path, module="sdsweep.report"))
    assert "report.html" in report
    markdown = (study / "report.md").read_text()
    links = re.findall(r"\]\(([^)]+\.png)\)", markdown)
    assert links and all((study / link).is_file() for link in links), links
    assert "Optuna storage not readable" not in markdown + (study / "report.html").read_text()

    export_dir = tmp_path / "exported"
    ok(sdsweep(str(study), "--to", str(export_dir), cwd=tmp_path, module="sdsweep.export"))
    assert (export_dir / "README.md").is_file() and (export_dir / "model_index.json").is_file()
    out = tmp_path / "generated.png"
    args = ["--prompt", "a photo of sks", "--num-images", "1", "--steps", "2", "--out", str(out)]
    ok(sdsweep(str(study), *args, cwd=tmp_path, module="sdsweep.generate"))
    assert Image.open(out).size[0] > 0

    from sdsweep.evaluation.rate import RatingSite
    from sdsweep.results.app import StudyApp

    app = StudyApp(study)
    assert app.choices()[1:] == [str(n) for n in sorted(results["trial"])]
    site = RatingSite.of(study)
    assert site.images and all((study / item.image).is_file() for item in site.images.values())


def test_an_older_study_json_with_locations_resumes_with_a_note(study_copy, tmp_path):
    home, overrides = study_copy
    study = home / "experiments" / "port"
    info = json.loads((study / "study.json").read_text())
    # What sdsweep 0.x wrote: the root and tracking keys in the identity, its own study.db by absolute path.
    info["fingerprint"]["settings"].update(
        {"paths.root": "/somewhere/else/experiments", "paths.cache": None, "tracking.dir": "/old/wandb"}
    )
    info["fingerprint"]["version"] = 1
    info["storage"] = "sqlite:////somewhere/else/experiments/port/study.db"
    (study / "study.json").write_text(json.dumps(info))
    output = ok(sdsweep(*overrides, "paths.root=experiments", cwd=home))
    assert_resumed_without_training(output, study)
    notes = [line for line in output.splitlines() if "older sdsweep that recorded where things were" in line]
    assert len(notes) == 1 and "paths.*" in notes[0] and "tracking.*" in notes[0], output[-3000:]
    rewritten = json.loads((study / "study.json").read_text())["fingerprint"]["settings"]
    assert not any(k.startswith(("paths.", "tracking.")) for k in rewritten)
    again = ok(sdsweep(*overrides, "paths.root=experiments", cwd=home))
    assert "older sdsweep" not in again  # said once: the locations are gone from study.json
    assert not Path("/somewhere/else").exists()


def test_data_copied_elsewhere_resumes_and_one_changed_caption_stops(study_copy, tmp_path):
    home, overrides = study_copy
    study = home / "experiments" / "port"
    copied = shutil.copytree(home / "data", tmp_path / "mounted" / "images")
    moved = [f"data.path={copied}" if o.startswith("data.path=") else o for o in overrides]
    assert_resumed_without_training(ok(sdsweep(*moved, "paths.root=experiments", cwd=home)), study)

    metadata = copied / "metadata.jsonl"
    rows = [json.loads(line) for line in metadata.read_text().splitlines()]
    rows[2]["text"] = "a photo of sks in a hat"
    metadata.write_text("".join(json.dumps(r) + "\n" for r in rows))
    refused = sdsweep(*moved, "paths.root=experiments", cwd=home)
    assert refused.returncode == 2, refused.stdout[-2000:] + refused.stderr[-2000:]
    assert "holds results of a different setup" in refused.stderr
    assert "1 file(s) with a new caption: 2.png" in refused.stderr, refused.stderr[-2000:]
    assert "Traceback" not in refused.stdout + refused.stderr
    assert trained_points(study) == Counter(dict.fromkeys(GRID, 1))


def test_two_drivers_see_one_postgresql_study_through_two_paths(postgres_url, tmp_path, drivers):
    """Two nodes mount the shared folder at different paths (here: two symlinks); one PostgreSQL study.
    Both join, the baseline is evaluated once and every grid point is trained exactly once."""
    shared = tmp_path / "shared"
    shared.mkdir()
    make_dataset(shared / "data")
    (tmp_path / "node-a").symlink_to(shared, target_is_directory=True)
    (tmp_path / "node-b").symlink_to(shared, target_is_directory=True)
    grid = ["sweep.learning_rates=[1e-4,1e-3]", "sweep.steps=[2,4]", "sweep.share_milestones=false"]
    common = [
        o
        for o in STUDY_OVERRIDES
        if not o.startswith(("sweep.isolation", "sweep.learning_rates", "sweep.steps"))
    ]
    common += grid + ["data=imagefolder", "data.num_heldout=1", f"sweep.storage={postgres_url}"]
    common += ["sweep.heartbeat_interval=1", "sweep.grace_period=4"]
    started = [
        drivers.start(
            common
            + [f"data.path={tmp_path / node / 'data'}", f"paths.root={tmp_path / node / 'experiments'}"],
            name=node,
        )
        for node in ("node-a", "node-b")
    ]
    for driver in started:
        assert driver.wait(600) == 0, driver.output()[-5000:]
        assert "holds results of a different setup" not in driver.output()
    study = shared / "experiments" / "port"
    expected = {(lr, steps) for lr in (1e-4, 1e-3) for steps in (2, 4)}
    assert trained_points(study) == Counter(dict.fromkeys(expected, 1))
    results = pd.read_csv(study / "results.csv")
    assert len(results) == 4 and (results["state"] == "COMPLETE").all(), results[["trial", "state"]]
    assert set(results["trial_dir"]) == {f"trials/{n:04d}" for n in results["trial"]}
    outputs = drivers.outputs()
    assert sum("evaluating the untuned base model" in line for line in outputs.splitlines()) == 1, outputs
    info = json.loads((study / "study.json").read_text())
    assert str(tmp_path) not in json.dumps(info["fingerprint"])
    drivers.assert_no_leftovers()
