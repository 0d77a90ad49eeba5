"""`make dashboard`: optuna-dashboard started on a real finished study, read over HTTP and in Chromium."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest
from conftest import REPO

VENV = Path(sys.prefix)  # the make target runs $(VENV)/bin/optuna-dashboard
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def get(url: str, timeout: float = 5.0) -> tuple[int, bytes]:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return response.status, response.read()


@pytest.fixture(scope="module")
def dashboard(finished_study):
    if not (VENV / "bin" / "optuna-dashboard").exists():
        pytest.skip(f"optuna-dashboard is not installed in {VENV} (pip install -e '.[dashboard]')")
    port = free_port()
    storage = f"sqlite:///{finished_study / 'study.db'}"
    # The real target; -o: the venv is already installed, do not let make pip-install it again.
    command = ["make", "--no-print-directory", "-o", str(VENV / ".installed"), "dashboard"]
    command += [f"VENV={VENV}", f"STORAGE={storage}", f"PORT={port}"]
    server = subprocess.Popen(
        command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                get(f"{base}/api/meta", timeout=2)
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    output = (
                        server.stdout.read().decode(errors="replace") if server.poll() is not None else ""
                    )
                    pytest.fail(f"optuna-dashboard did not answer on {base}: {output[-2000:]}")
                time.sleep(0.5)
        yield base
    finally:
        os.killpg(server.pid, signal.SIGTERM)  # make, its shell and the server: the group we started
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()


def test_dashboard_serves_the_study(dashboard):
    status, page = get(f"{dashboard}/dashboard")
    assert status == 200 and b"<html" in page.lower()
    status, body = get(f"{dashboard}/api/studies")
    studies = json.loads(body)["study_summaries"]
    assert status == 200
    [study] = [s for s in studies if s["study_name"] == "finished"]
    status, body = get(f"{dashboard}/api/studies/{study['study_id']}")
    trials = json.loads(body)["trials"]
    assert len(trials) == 4 and {str(t["state"]).lower() for t in trials} == {"complete"}


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (make browser installs Debian's)")
def test_dashboard_shows_the_trials_in_chromium(dashboard, tmp_path):
    _, body = get(f"{dashboard}/api/studies")
    study_id = next(
        s["study_id"] for s in json.loads(body)["study_summaries"] if s["study_name"] == "finished"
    )
    url = f"{dashboard}/dashboard/studies/{study_id}/trials"
    profile = tempfile.mkdtemp(prefix="chromium-profile-", dir=tmp_path)
    flags = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--no-first-run",
        f"--user-data-dir={profile}",
        "--virtual-time-budget=15000",  # let the single-page app fetch the study and render it
    ]
    screenshot = tmp_path / "dashboard.png"
    subprocess.run(
        [CHROMIUM, *flags, f"--screenshot={screenshot}", "--window-size=1400,1000", url],
        capture_output=True,
        timeout=120,
    )
    dom = subprocess.run(
        [CHROMIUM, *flags, "--dump-dom", url], capture_output=True, text=True, timeout=120
    ).stdout
    assert screenshot.exists() and screenshot.stat().st_size > 10_000  # a rendered page, not a blank one
    # The trial list renders every trial ("Trial 0" .. "Trial 3") and its parameters.
    for number in range(4):
        assert f"Trial {number}" in dom, dom[-3000:]
    assert "method.learning_rate" in dom


def _study_and_trial_ids(dashboard) -> tuple[int, list[dict]]:
    _, body = get(f"{dashboard}/api/studies")
    study_id = next(
        s["study_id"] for s in json.loads(body)["study_summaries"] if s["study_name"] == "finished"
    )
    _, body = get(f"{dashboard}/api/studies/{study_id}")
    return study_id, json.loads(body)["trials"]


def test_each_trial_grid_is_an_artifact_served_by_the_dashboard(dashboard, finished_study):
    import optuna

    from sdsweep.study import artifacts

    study_id, trials = _study_and_trial_ids(dashboard)
    for trial in trials:
        [grid] = [a for a in trial["artifacts"] if a["filename"] == "grid.png"]
        status, png = get(f"{dashboard}/artifacts/{study_id}/{trial['trial_id']}/{grid['artifact_id']}")
        assert status == 200 and png.startswith(b"\x89PNG")
        local = finished_study / "trials" / f"{trial['number']:04d}" / "grid.png"
        assert png == local.read_bytes()
    # The baseline's grid is on the study; a second upload (a resume or takeover) adds nothing.
    storage = f"sqlite:///{finished_study / 'study.db'}"
    study = optuna.load_study(study_name="finished", storage=storage)
    names = [m.filename for m in optuna.artifacts.get_all_artifact_meta(study)]
    assert names == [artifacts.BASELINE_GRID]
    trial = study.trials[0]
    store = artifacts.artifact_dir(finished_study, None)
    assert artifacts.upload_once(store, store.parent / "trials/0000/grid.png", trial, study._storage) is None
    assert len(optuna.artifacts.get_all_artifact_meta(trial, storage=study._storage)) == 1


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (make browser installs Debian's)")
def test_dashboard_trial_page_shows_its_grid_in_chromium(dashboard, tmp_path):
    study_id, trials = _study_and_trial_ids(dashboard)
    url = f"{dashboard}/dashboard/studies/{study_id}/trials?numbers={trials[1]['number']}"
    profile = tempfile.mkdtemp(prefix="chromium-profile-", dir=tmp_path)
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", f"--user-data-dir={profile}"]
    flags += ["--disable-background-networking", "--disable-component-update", "--virtual-time-budget=15000"]
    dom = subprocess.run(
        [CHROMIUM, *flags, "--window-size=1400,2000", "--dump-dom", url],
        capture_output=True,
        text=True,
        timeout=120,
    ).stdout
    [grid] = [a for a in trials[1]["artifacts"] if a["filename"] == "grid.png"]
    assert "grid.png" in dom, dom[-3000:]
    assert f"/artifacts/{study_id}/{trials[1]['trial_id']}/{grid['artifact_id']}" in dom  # the image itself
