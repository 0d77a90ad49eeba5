"""The README's commands, typed as a user types them, in a fresh copy of the repository (#32).

A command in the README that no test runs is a command that will break again: `make demo-methods` failed
its own preflight while a test calling ``run_sweep()`` directly passed. Here every command goes through
``make`` or ``python -m`` in a subprocess, from the copy's root, with a ``.venv`` there as ``make setup``
leaves it (the running interpreter's environment, linked, with its install stamp), so nothing is
reinstalled. Grids are shrunk through ``ARGS`` only where the command path stays the same.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pandas as pd
import pytest
from conftest import REPO

# Not copied: what a fresh clone does not have (outputs, caches, the developer's own venv).
IGNORED = (".git", ".venv", "experiments", "exported", "out", "__pycache__", ".pytest_cache", ".ruff_cache")
IGNORED += ("*.egg-info", "build", "outputs", "multirun")


def _venv_like_setup(target: Path) -> None:
    """``<copy>/.venv`` as `make setup` leaves it, reusing the running interpreter's packages."""
    venv, bin_dir = target / ".venv", target / ".venv" / "bin"
    bin_dir.mkdir(parents=True)
    if sys.prefix != sys.base_prefix:  # in a venv: the same pyvenv.cfg and site-packages
        shutil.copy(Path(sys.prefix) / "pyvenv.cfg", venv / "pyvenv.cfg")
        for name in ("lib", "lib64"):
            if (Path(sys.prefix) / name).exists():
                (venv / name).symlink_to(Path(sys.prefix) / name, target_is_directory=True)
        python = Path(sys.prefix) / "bin" / "python"
        (bin_dir / "python").symlink_to(python.resolve())  # the base interpreter finds ../pyvenv.cfg
    else:
        (bin_dir / "python").symlink_to(sys.executable)
    dashboard = shutil.which("optuna-dashboard", path=str(Path(sys.executable).parent)) or shutil.which(
        "optuna-dashboard"
    )
    if dashboard:
        (bin_dir / "optuna-dashboard").symlink_to(dashboard)
    (venv / ".installed").touch()  # newer than pyproject.toml: make does not pip-install again


@pytest.fixture(scope="module")
def clone(tmp_path_factory) -> Path:
    target = tmp_path_factory.mktemp("clone") / "sdsweep"
    shutil.copytree(REPO, target, ignore=shutil.ignore_patterns(*IGNORED), symlinks=True)
    (target / "experiments").mkdir()
    _venv_like_setup(target)
    return target


def run(clone: Path, command: str, timeout: float = 300, check: bool = True) -> subprocess.CompletedProcess:
    """One line as typed in a shell at the copy's root (the session's SDSWEEP_CACHE: models build once)."""
    env = {**os.environ, "PYTHONPATH": str(clone), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    done = subprocess.run(
        ["bash", "-c", command], cwd=clone, env=env, capture_output=True, text=True, timeout=timeout
    )
    if check and done.returncode != 0:
        pytest.fail(f"`{command}` exited {done.returncode}:\n{(done.stdout + done.stderr)[-4000:]}")
    return done


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_http(url: str, proc: subprocess.Popen, timeout: float = 90) -> bytes:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                return response.read()
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                output = proc.stdout.read() if proc.poll() is not None else b""
                pytest.fail(f"nothing answered on {url}: {output.decode(errors='replace')[-2000:]}")
            time.sleep(0.5)


def stop_group(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGTERM)  # make, its shell and the server: the group this test started
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def tables_fit(report: Path, tmp_path: Path) -> list[dict]:
    """Every report table's scroll width against its container's, in Chromium at a 1300 px window."""
    from cdp import Browser

    browser = Browser(tmp_path / "chromium-profile", width=1300, height=900)
    try:
        browser.navigate(report.resolve().as_uri())
        return browser.evaluate(
            "[...document.querySelectorAll('table')].map(t => ({table: t.scrollWidth,"
            " wrap: t.parentElement.clientWidth, content: document.body.clientWidth,"
            " last: t.rows[0].cells[t.rows[0].cells.length - 1].textContent}))"
        )
    finally:
        browser.close()


# ---- help, plan and a single run ------------------------------------------------------------------------
def test_make_help_lists_the_readme_targets(clone):
    out = run(clone, "make help").stdout
    for target in (
        "setup",
        "demo",
        "demo-tiny",
        "demo-methods",
        "sweep",
        "workers",
        "test",
        "report",
        "export",
    ):
        assert f" {target} " in out.replace("\x1b[36m", " ").replace("\x1b[0m", " "), target


def test_help_lists_commands_and_config_groups(clone):
    out = run(clone, ".venv/bin/python -m sdsweep --help").stdout
    assert "--plan" in out
    for group in ("model", "method", "data", "eval", "sweep", "experiment"):
        assert group in out


def test_plan_of_the_readme_gpu_sweep_loads_nothing(clone, tmp_path):
    data = tmp_path / "my_dog"
    data.mkdir()
    (data / "metadata.jsonl").write_text('{"file_name": "001.jpg", "text": "a photo of sks dog"}\n')
    command = (
        f".venv/bin/python -m sdsweep --plan +sweep=lr_steps model=sd15 method=full data=imagefolder "
        f"data.path={data} study=dog-full"
    )
    out = run(clone, command, timeout=120).stdout
    assert "training steps" in out.lower() and "milestone" in out.lower()
    study = clone / "experiments" / "dog-full"  # Hydra's own log may land there; no study is started
    assert not (study / "study.db").exists() and not (study / "study.json").exists()


def test_a_single_run_without_sweep_lands_in_the_study_layout(clone):
    command = (
        ".venv/bin/python -m sdsweep model=tiny data=demo eval=tiny tracking=none "
        "train.max_train_steps=2 eval.num_images_per_prompt=1 eval.num_inference_steps=2 study=single"
    )
    out = run(clone, command).stdout
    study = clone / "experiments" / "single"
    assert "results.csv" in out
    results = pd.read_csv(study / "results.csv")
    assert list(results["state"]) == ["COMPLETE"]
    assert (study / "trials" / "0000" / "metrics.json").is_file() and (study / "baseline").is_dir()


def test_preflight_lists_every_missing_thing_at_once(clone, tmp_path):
    """#32.2: the README promises one message naming everything missing, not the first problem only."""
    command = (
        f".venv/bin/python -m sdsweep model=sd15 data=imagefolder data.path={tmp_path / 'no-data'} "
        f"eval.clip_model={tmp_path / 'no-clip'} eval.safety_checker={tmp_path / 'no-checker'}"
    )
    done = run(clone, command, timeout=120, check=False)
    assert done.returncode != 0
    message = done.stdout + done.stderr
    assert "stable-diffusion-v1-5/stable-diffusion-v1-5" in message
    assert "no-data" in message and "no-clip" in message and "no-checker" in message
    assert "Traceback" not in message


# ---- make demo-tiny, then what the README does with a finished study ------------------------------------
@pytest.fixture(scope="module")
def demo_tiny(clone) -> Path:
    """`make demo-tiny` as typed: the recipe's own grid, W&B offline, the report at the end."""
    out = run(clone, "make demo-tiny", timeout=600).stdout
    study = clone / "experiments" / "demo_tiny"
    assert "report: experiments/demo_tiny/report.html" in out
    return study


# `make demo-tiny` takes about a minute on 2 cores: the tests that read its study are marked slow.
@pytest.mark.slow
def test_demo_tiny_fills_its_grid(demo_tiny):
    results = pd.read_csv(demo_tiny / "results.csv")
    assert len(results) == 6 and (results["state"] == "COMPLETE").all()
    logs = sorted(p.name for p in (demo_tiny / "runs").glob("worker-*.log"))
    assert logs and all(name.count("-") >= 3 for name in logs), logs  # worker-<host>-<pid>-<slot>.log
    assert (demo_tiny / "runs" / logs[0]).read_text().startswith("# sdsweep worker 0, driver pid ")
    assert "max_length" not in "".join(p.read_text() for p in (demo_tiny / "runs").glob("worker-*.log"))


@pytest.mark.slow
def test_make_report_and_export(clone, demo_tiny):
    report = demo_tiny / "report.html"
    report.unlink()
    run(clone, "make report STUDY=demo_tiny")
    assert report.is_file() and (demo_tiny / "report.md").is_file()
    run(clone, "make export STUDY=demo_tiny TO=exported/demo_tiny")
    exported = clone / "exported" / "demo_tiny"
    assert (exported / "README.md").is_file()
    assert (exported / "model_index.json").is_file() or list(exported.rglob("*.safetensors"))


@pytest.mark.slow
def test_generate_from_the_best_trial(clone, demo_tiny):
    command = '.venv/bin/python -m sdsweep.generate experiments/demo_tiny --trial best --prompt "a photo of sks" --out out/'
    run(clone, command)
    assert len(list((clone / "out").rglob("*.png"))) == 4  # --num-images defaults to 4


@pytest.mark.slow
def test_make_dashboard_answers_over_http(clone, demo_tiny):
    if not (clone / ".venv" / "bin" / "optuna-dashboard").exists():
        pytest.skip("optuna-dashboard is not installed (pip install -e '.[dashboard]')")
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(clone)}
    proc = subprocess.Popen(
        ["bash", "-c", f"make dashboard STUDY=demo_tiny PORT={port}"],
        cwd=clone,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        body = wait_for_http(f"http://127.0.0.1:{port}/api/studies", proc)
        names = [s["study_name"] for s in json.loads(body)["study_summaries"]]
        assert names == ["demo_tiny"]
    finally:
        stop_group(proc)


@pytest.mark.slow
def test_rate_serves_the_study_and_app_has_help(clone, demo_tiny):
    port = free_port()
    proc = subprocess.Popen(
        ["bash", "-c", f".venv/bin/python -m sdsweep.rate experiments/demo_tiny --port {port}"],
        cwd=clone,
        env={**os.environ, "PYTHONPATH": str(clone)},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        assert b"<html" in wait_for_http(f"http://127.0.0.1:{port}/", proc).lower()
    finally:
        stop_group(proc)
    assert "study" in run(clone, ".venv/bin/python -m sdsweep.rate --help").stdout
    assert "--port" in run(clone, ".venv/bin/python -m sdsweep.app --help").stdout


@pytest.mark.slow
def test_report_tables_fit_a_1300px_window(demo_tiny, tmp_path):
    """#32.6: the leaderboard's note column was cut off at the right edge."""
    from cdp import chromium_available

    if not chromium_available():
        pytest.skip("chromium is not installed (make browser installs Debian's)")
    tables = tables_fit(demo_tiny / "report.html", tmp_path)
    assert tables and all(t["table"] <= t["wrap"] <= t["content"] for t in tables), tables


# ---- make demo-methods: the shapes model x method study ---------------------------------------------------
@pytest.mark.slow
def test_make_demo_methods_passes_its_preflight_and_fills_every_cell(clone, tmp_path):
    """#32.1: the headline command failed at once ('shapes:sd15' is not available offline). Same command
    path, shorter runs: 4 steps, 1 image per prompt, 2 sampling steps (the shapes build is the session's)."""
    args = "train.max_train_steps=4 eval.num_images_per_prompt=1 eval.num_inference_steps=2"
    out = run(clone, f'make demo-methods ARGS="{args}"', timeout=1500).stdout
    assert "report: experiments/demo_methods/report.html" in out
    study = clone / "experiments" / "demo_methods"
    results = pd.read_csv(study / "results.csv")
    methods = {"full", "dreambooth", "textual_inversion", "lora"}
    assert (
        set(zip(results["model"], results["method"]))
        == {(m, x) for m in ("shapes", "tiny_sd21", "tiny_sdxl") for x in methods}
        and len(results) == 12
    )
    assert (results["state"] == "COMPLETE").all()
    logs = "".join(p.read_text() for p in (study / "runs").glob("worker-*.log"))
    assert logs and "max_length" not in logs  # #32.5: no tokenizer warning per evaluation
    from cdp import chromium_available

    if chromium_available():  # eight metric columns and notes: the table that overflowed (1287 px in 1200)
        tables = tables_fit(study / "report.html", tmp_path)
        assert all(t["table"] <= t["wrap"] for t in tables), tables
