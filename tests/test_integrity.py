"""Study integrity: identity fingerprints, damaged study folders, torn records, file permissions (#12)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sqlite3
import stat
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
from conftest import REPO, TINY_OVERRIDES
from PIL import Image

from sdsweep import io
from sdsweep.cli import UserError, preflight
from sdsweep.errors import ConfigError
from sdsweep.sweep.fingerprint import RESET_MARKER_ENV


def folder_digest(folder: Path) -> str:
    """Every file's path, bytes and mode: equal digests mean nothing in the folder changed.

    hydra/ is left out: Hydra itself creates its run folder (hydra.run.dir) before sdsweep runs.
    """
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if "hydra" not in p.relative_to(folder).parts[:1]):
        digest.update(str(path.relative_to(folder)).encode())
        if path.is_file():
            digest.update(path.read_bytes())
            digest.update(str(stat.S_IMODE(path.stat().st_mode)).encode())
    return digest.hexdigest()


def make_dataset(folder: Path, count: int = 3) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(count):
        Image.new("RGB", (32, 32), (40 * i, 100, 200)).save(folder / f"{i}.png")
        rows.append({"file_name": f"{i}.png", "text": f"a photo of sks number {i}"})
    (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def sweep_overrides(root: Path, data: Path, *extra: str) -> list[str]:
    return TINY_OVERRIDES + [
        f"paths.root={root}",
        "study=s",
        "data=imagefolder",
        f"data.path={data}",
        "data.num_heldout=1",
        "+sweep=lr_steps",
        "method=lora",
        *extra,
    ]


@pytest.fixture(autouse=True)
def _no_reset_marker(monkeypatch):
    monkeypatch.delenv(RESET_MARKER_ENV, raising=False)


# ---- permissions ------------------------------------------------------------------------------------
def test_atomic_writes_honour_the_umask(tmp_path):
    previous = os.umask(0o022)
    os.umask(previous)
    assert io.FILE_MODE == 0o666 & ~previous and io.DIR_MODE == 0o777 & ~previous
    for path in (
        io.atomic_write_json(tmp_path / "a.json", {"x": 1}),
        io.atomic_write_text(tmp_path / "b.txt", "x"),
        io.atomic_save_image(tmp_path / "c.png", Image.new("RGB", (2, 2))),
    ):
        assert stat.S_IMODE(path.stat().st_mode) == io.FILE_MODE
    staging = io.staging_dir(tmp_path / "weights")
    assert stat.S_IMODE(staging.stat().st_mode) == io.DIR_MODE
    if previous == 0o022:
        assert io.FILE_MODE == 0o644 and io.DIR_MODE == 0o755
    assert not list(tmp_path.glob(".*.tmp"))


def test_a_torn_json_file_is_named(tmp_path):
    path = tmp_path / "metrics.json"
    path.write_text('{"trial": 3, "metr')
    with pytest.raises(io.DamagedFileError, match="metrics.json is damaged"):
        io.read_json(path)
    assert io.read_json_or_none(path) is None
    assert io.read_json(tmp_path / "absent.json", "default") == "default"


# ---- study identity ---------------------------------------------------------------------------------
def test_study_json_records_a_fingerprint_and_a_rerun_matches(tmp_path):
    data = make_dataset(tmp_path / "data")
    overrides = sweep_overrides(tmp_path / "exp", data)
    preflight(overrides)
    study_json = tmp_path / "exp" / "s" / "study.json"
    info = json.loads(study_json.read_text())
    for key in ("study", "storage", "sweep", "params", "objectives", "model", "method", "eval", "overrides"):
        assert key in info
    assert sorted(info["fingerprint"]["data"]) == ["0.png", "1.png", "2.png"]
    assert "method.learning_rate" not in info["fingerprint"]["settings"]  # swept
    assert info["fingerprint"]["settings"]["method.rank"] == 4
    before = study_json.read_bytes()
    preflight(overrides + ["sweep.learning_rates=[1e-3]"])  # a swept value may change freely
    assert json.loads(study_json.read_bytes())["fingerprint"] == json.loads(before)["fingerprint"]


def test_changed_data_or_settings_stop_with_what_changed(tmp_path):
    data = make_dataset(tmp_path / "data")
    overrides = sweep_overrides(tmp_path / "exp", data)
    preflight(overrides)
    study = tmp_path / "exp" / "s"
    before = folder_digest(study)

    with pytest.raises(ConfigError, match=r"method\.rank: 4 -> 8") as caught:
        preflight(overrides + ["method.rank=8"])
    assert "study=<new name>" in str(caught.value) and "study_reset=true" in str(caught.value)

    Image.new("RGB", (32, 32), (0, 0, 0)).save(data / "1.png")  # edited in place
    Image.new("RGB", (32, 32), (9, 9, 9)).save(data / "new.png")
    with open(data / "metadata.jsonl", "a") as f:
        f.write(json.dumps({"file_name": "new.png", "text": "a photo of sks new"}) + "\n")
    with pytest.raises(ConfigError, match=r"data: 1 file\(s\) changed: 1\.png; 1 file\(s\) added: new\.png"):
        preflight(overrides)
    assert folder_digest(study) == before


def test_another_dataset_gets_its_own_default_study(tmp_path):
    first, second = make_dataset(tmp_path / "dogs"), make_dataset(tmp_path / "cats", 4)
    base = [o for o in sweep_overrides(tmp_path / "exp", first) if o != "study=s"]
    preflight(base)
    preflight([o.replace(str(first), str(second)) for o in base])
    assert sorted(p.name for p in (tmp_path / "exp").iterdir()) == ["tiny-lora-cats", "tiny-lora-dogs"]


def test_study_reset_moves_the_old_study_aside_and_keeps_its_files(tmp_path):
    data = make_dataset(tmp_path / "data")
    overrides = sweep_overrides(tmp_path / "exp", data)
    preflight(overrides)
    study = tmp_path / "exp" / "s"
    (study / "trials" / "0000").mkdir(parents=True)
    (study / "trials" / "0000" / "metrics.json").write_text("{}")
    sqlite3.connect(study / "study.db").close()
    old_digest = folder_digest(study)
    preflight(overrides + ["method.rank=8", "study_reset=true"])
    aside = [p for p in (tmp_path / "exp").iterdir() if p.name.startswith("s.old-")]
    assert len(aside) == 1 and folder_digest(aside[0]) == old_digest
    assert json.loads((study / "study.json").read_text())["fingerprint"]["settings"]["method.rank"] == 8
    preflight(overrides + ["method.rank=8", "study_reset=true"])  # same command again: not moved twice
    assert len([p for p in (tmp_path / "exp").iterdir() if p.name.startswith("s.old-")]) == 1


# ---- damaged study folders --------------------------------------------------------------------------
def real_sqlite(path: Path) -> None:
    connection = sqlite3.connect(path)
    connection.execute("CREATE TABLE trials (id INTEGER PRIMARY KEY, payload BLOB)")
    connection.executemany(
        "INSERT INTO trials (payload) VALUES (?)", [(os.urandom(2000),) for _ in range(100)]
    )
    connection.execute("CREATE INDEX by_payload ON trials (payload)")
    connection.commit()
    connection.close()


def _truncated(path: Path) -> None:
    real_sqlite(path)
    size = path.stat().st_size
    with open(path, "r+b") as f:
        f.truncate(size // 2)


@pytest.mark.parametrize(
    "damage, expected",
    [
        (lambda p: p.write_bytes(b""), "study.db is empty"),
        (lambda p: p.write_bytes(b"not a database at all" * 100), "study.db is not an SQLite database"),
        (_truncated, "study.db is damaged"),
    ],
    ids=["empty", "garbage", "truncated"],
)
def test_a_damaged_study_db_is_refused_by_name_and_left_alone(tmp_path, damage, expected):
    data = make_dataset(tmp_path / "data")
    overrides = sweep_overrides(tmp_path / "exp", data)
    preflight(overrides)
    study = tmp_path / "exp" / "s"
    damage(study / "study.db")
    before = folder_digest(study)
    with pytest.raises(UserError, match=expected) as caught:
        preflight(overrides)
    assert "study_reset=true" in str(caught.value)
    assert folder_digest(study) == before


# A writer SIGKILLed inside a transaction, as a killed sweep process can be: its changes are still in the
# database file and the original pages in the rollback journal (the cache is too small to hold them).
_KILLED_WRITER = """
import os, signal, sqlite3, sys
connection = sqlite3.connect(sys.argv[1], isolation_level=None)
connection.execute("PRAGMA cache_size=2")
connection.execute("BEGIN IMMEDIATE")
connection.executemany("INSERT INTO trials (payload) VALUES (?)", [(os.urandom(2000),) for _ in range(200)])
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_a_study_db_left_mid_transaction_by_a_killed_process_is_recovered_not_refused(tmp_path):
    """The hot journal of a killed writer is SQLite's normal crash recovery, not damage: the preflight
    lets the next connection roll it back (a read-only check used to call the study damaged)."""
    data = make_dataset(tmp_path / "data")
    overrides = sweep_overrides(tmp_path / "exp", data)
    preflight(overrides)
    db = tmp_path / "exp" / "s" / "study.db"
    real_sqlite(db)
    killed = subprocess.run([sys.executable, "-c", _KILLED_WRITER, str(db)], capture_output=True)
    assert killed.returncode == -9, killed.stderr
    journal = db.with_name("study.db-journal")
    assert journal.exists() and journal.stat().st_size > 0, "no hot journal: the test set nothing up"
    preflight(overrides)  # no error
    connection = sqlite3.connect(db)
    assert connection.execute("SELECT count(*) FROM trials").fetchone()[0] == 100  # the killed insert is gone
    assert connection.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    connection.close()


@pytest.mark.parametrize("relative", ["study.json", "baseline/metrics.json"])
def test_a_torn_study_record_is_refused_by_name(tmp_path, relative):
    data = make_dataset(tmp_path / "data")
    overrides = sweep_overrides(tmp_path / "exp", data)
    preflight(overrides)
    path = tmp_path / "exp" / "s" / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text('{"state": "COMPL')
    before = folder_digest(tmp_path / "exp" / "s")
    with pytest.raises(UserError, match=f"{relative} is damaged"):
        preflight(overrides)
    assert folder_digest(tmp_path / "exp" / "s") == before


def test_trials_without_their_study_db_are_not_overwritten(tmp_path):
    data = make_dataset(tmp_path / "data")
    overrides = sweep_overrides(tmp_path / "exp", data)
    (tmp_path / "exp" / "s" / "trials" / "0000").mkdir(parents=True)
    with pytest.raises(UserError, match="study.db is missing"):
        preflight(overrides)


# ---- one damaged trial in results and the report -----------------------------------------------------
def test_a_torn_trial_record_is_listed_as_damaged(tmp_path):
    from sdsweep.results.table import DAMAGED, build_results

    paths = io.StudyPaths(tmp_path / "study")
    good = paths.trial(0)
    good.mkdir(parents=True)
    io.atomic_write_json(
        good / io.TRIAL_METRICS,
        {"trial": 0, "state": "COMPLETE", "metrics": {"eval/clip_score": 0.3}, "weights": "weights"},
    )
    paths.trial(1).mkdir(parents=True)
    (paths.trial(1) / io.TRIAL_METRICS).write_text('{"trial": 1, "sta')
    frame = build_results(paths)
    assert list(frame["trial"]) == [0, 1]
    damaged = frame[frame["trial"] == 1].iloc[0]
    assert damaged["state"] == DAMAGED and "metrics.json is damaged" in damaged["fail_reason"]
    healthy = frame[frame["trial"] == 0].iloc[0]
    assert healthy["weights_dir"] is None or healthy["weights_dir"] != healthy["weights_dir"]  # None / NaN
    assert "no longer exist" in healthy["warnings"]


@pytest.mark.slow
def test_report_and_results_survive_a_torn_trial_record(finished_study, tmp_path):
    from sdsweep.results.report import build_report
    from sdsweep.results.table import DAMAGED, write_results

    study = tmp_path / "study"
    shutil.copytree(finished_study, study)
    (study / "trials" / "0001" / "metrics.json").write_text('{"trial": 1, "metr')
    frame = write_results(io.StudyPaths(study))
    assert DAMAGED in set(frame["state"])
    html, _ = build_report(study)
    assert DAMAGED in html.read_text()


# ---- end to end through the real entry point ----------------------------------------------------------
def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop(RESET_MARKER_ENV, None)
    return subprocess.run(
        [sys.executable, "-m", "sdsweep", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.mark.slow
def test_cli_refuses_a_truncated_study_db_and_changes_nothing(tmp_path):
    data = make_dataset(tmp_path / "data")
    overrides = sweep_overrides(tmp_path / "exp", data)
    preflight(overrides)
    study = tmp_path / "exp" / "s"
    _truncated(study / "study.db")
    before = folder_digest(study)
    result = run_cli(*overrides)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "study.db is damaged" in result.stderr and "Traceback" not in result.stderr
    assert folder_digest(study) == before


@pytest.mark.slow
def test_cli_refuses_changed_data_and_changes_nothing(tmp_path):
    data = make_dataset(tmp_path / "data")
    overrides = sweep_overrides(tmp_path / "exp", data)
    preflight(overrides)
    study = tmp_path / "exp" / "s"
    (data / "2.png").unlink()
    (data / "metadata.jsonl").write_text(
        "".join(
            json.dumps({"file_name": f"{i}.png", "text": f"a photo of sks number {i}"}) + "\n"
            for i in range(2)
        )
    )
    before = folder_digest(study)
    result = run_cli(*overrides)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "data: 1 file(s) removed: 2.png" in result.stderr
    assert folder_digest(study) == before


@pytest.mark.slow
@pytest.mark.parametrize("isolation", ["subprocess", "inprocess"])
def test_data_changed_while_a_sweep_runs_stops_it_before_the_next_run(isolation, tmp_path):
    """An image edited mid-sweep: the run already training finishes on the data it loaded, no later run
    starts (it would not be comparable), the command says which file changed (exit 2, no traceback),
    and after the file is put back the same command finishes the grid.

    The edit lands once the second run has started; on a busy machine that run may not have loaded its
    data yet. Then it is handed back (no record, never FAIL) and trained by the re-run; either way no run
    trains on data the study does not hold."""
    data = make_dataset(tmp_path / "data", count=4)
    overrides = sweep_overrides(
        tmp_path / "exp",
        data,
        "sweep.learning_rates=[1e-4,1e-3,1e-2]",
        "sweep.steps=[40]",
        "sweep.keep_best_k=-1",
        "sweep.build_report=false",
        f"sweep.isolation={isolation}",
        "eval.metrics=[clip_score,appropriate_rate,val_loss]",
    )
    study = tmp_path / "exp" / "s"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    sweep = subprocess.Popen(
        [sys.executable, "-m", "sdsweep", *overrides],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    original = (data / "1.png").read_bytes()
    deadline = time.monotonic() + 300
    while len(list(study.glob("trials/*/config.yaml"))) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)  # the second run has started (it writes its trial's config.yaml first)
    Image.new("RGB", (32, 32), (255, 0, 0)).save(data / "1.png")
    out, err = sweep.communicate(timeout=600)
    assert sweep.returncode == 2, out[-3000:] + err[-3000:]
    assert "changed while its sweep was running" in err and "1.png" in err, err[-3000:]
    assert "Traceback" not in out + err
    records = [json.loads(p.read_text()) for p in study.glob("trials/*/metrics.json")]
    states = sorted(r["state"] for r in records)
    # The first run finished; the second finished on the data it loaded, or was handed back unrecorded.
    assert states in (["COMPLETE"], ["COMPLETE", "COMPLETE"]), states
    assert len(list(study.glob("trials/*/config.yaml"))) == 2  # the third run never started
    (data / "1.png").write_bytes(original)
    again = run_cli(*overrides)
    assert again.returncode == 0, again.stderr[-3000:]
    results = pd.read_csv(study / "results.csv")
    assert len(results) == 3 and (results["state"] == "COMPLETE").all()


@pytest.mark.slow
def test_a_run_whose_data_changed_before_it_loaded_it_is_handed_back_not_failed(tmp_path):
    """The window the busy-machine flake fell into, made deterministic: the run is claimed (the study
    matched), then an image changes before the run loads its data. The run raises the study change, its
    trial is handed back (no record, not a result) and never FAIL in results; nothing trained on the edit."""
    from sdsweep.study.trial_tags import HANDED_BACK
    from sdsweep.sweep.claims import Heartbeat
    from sdsweep.sweep.driver import SweepDriver
    from sdsweep.sweep.fingerprint import StudyMismatchError, ensure_study_identity

    data = make_dataset(tmp_path / "data", count=4)
    overrides = sweep_overrides(
        tmp_path / "exp", data, "sweep.learning_rates=[1e-4]", "sweep.steps=[2]", "sweep.isolation=inprocess"
    )
    driver = SweepDriver(overrides)
    engine = driver.engine
    ensure_study_identity(driver.cfg, driver.paths, driver.overrides)
    engine.ensure_baseline()
    spec = engine.next_run()
    assert spec is not None
    Image.new("RGB", (32, 32), (255, 0, 0)).save(data / "1.png")  # after the claim, before the run loads
    engine.heartbeat = Heartbeat(engine.handle, engine.sweep.heartbeat_interval)
    try:
        with pytest.raises(StudyMismatchError, match="1.png"):
            engine.run_one(spec)
    finally:
        engine.heartbeat.stop()
    (number,) = [slot.number for slot in spec.slots]
    trial = engine.handle.get_trial(number)
    assert trial.user_attrs.get(HANDED_BACK), trial.user_attrs
    assert not (driver.paths.trial(number) / "metrics.json").exists()
    assert engine.publish_results().empty  # a handed-back attempt is no result, least of all a FAIL
