"""Parallel and distributed sweeps (issue #11), black-box: real driver processes, real storage, real signals.

Every test starts ``python -m sdsweep`` subprocesses (tests/drivers.py) on the tiny model and judges them
only by what a user can see: exit codes, output, the study in storage, results.csv and the files on disk.
Runs are counted from artefacts: a run writes ``config.yaml`` into each of its trials' folders when it
starts, so a point trained twice shows up as two folders for one grid point.
"""

from __future__ import annotations

import json
import signal
import threading
import time
from collections import Counter
from pathlib import Path

import optuna
import pandas as pd
import pytest
import yaml
from conftest import TINY_OVERRIDES
from drivers import wait_until

LR_KEY, STEP_KEY = "method.learning_rate", "train.max_train_steps"
LEARNING_RATES, STEPS = (1e-4, 1e-3), (2, 4)
GRID = {(lr, steps) for lr in LEARNING_RATES for steps in STEPS}
DRIVER_TIMEOUT = 480  # seconds (a busy shared CI core is slow); a hung driver fails its test, never hangs it

# Cheap evaluation, one step per log line (history shows where a resumed run started), heartbeats fast
# enough that a dead run is taken over within seconds.
PARALLEL_OVERRIDES = TINY_OVERRIDES + [
    "eval.metrics=[clip_score,appropriate_rate,val_loss]",
    "eval.prompts=[a photo of sks]",
    "train.log_every=1",
    "+sweep=lr_steps",
    f"sweep.learning_rates=[{','.join(f'{lr:g}' for lr in LEARNING_RATES)}]",
    f"sweep.steps=[{','.join(str(s) for s in STEPS)}]",
    "sweep.keep_best_k=-1",
    "sweep.build_report=false",
    "sweep.heartbeat_interval=1",
    "sweep.grace_period=4",
]


@pytest.fixture(autouse=True)
def _tiny_assets(tiny_model_dirs, demo_data_dir, tiny_clip_dir):
    """Build the tiny models once, before several drivers would race to build them."""


def sweep_args(root: Path, *extra: str, study: str = "par") -> list[str]:
    return PARALLEL_OVERRIDES + [f"paths.root={root}", f"study={study}", *extra]


# ---- reading a study back ---------------------------------------------------------------------------
def storage_for(url: str):
    if url.endswith(".journal") or url.startswith("journal:"):
        from optuna.storages import JournalStorage
        from optuna.storages.journal import JournalFileBackend

        return JournalStorage(JournalFileBackend(url.removeprefix("journal://")))
    return url


def load_trials(study_dir: Path, storage: str | None = None) -> list[optuna.trial.FrozenTrial]:
    url = storage or f"sqlite:///{study_dir / 'study.db'}"
    return optuna.load_study(study_name=study_dir.name, storage=storage_for(url)).get_trials(deepcopy=False)


def point_of(trial: optuna.trial.FrozenTrial) -> tuple[float, int]:
    return float(trial.params[LR_KEY]), int(trial.params[STEP_KEY])


def assert_grid_complete_once(study_dir: Path, storage: str | None = None) -> None:
    """Every grid point COMPLETE exactly once in storage, and one COMPLETE results.csv row per point."""
    trials = load_trials(study_dir, storage)
    complete = Counter(point_of(t) for t in trials if t.state.name == "COMPLETE")
    assert set(complete) == GRID, f"complete points {sorted(complete)} != grid {sorted(GRID)}"
    assert set(complete.values()) == {1}, f"a point completed more than once: {complete}"
    results = pd.read_csv(study_dir / "results.csv")
    assert len(results) == len(GRID), results[["trial", "state", LR_KEY, STEP_KEY]]
    assert (results["state"] == "COMPLETE").all(), results[["trial", "state", "fail_reason"]]
    assert set(zip(results[LR_KEY].astype(float), results[STEP_KEY].astype(int))) == GRID


def trained_folders(study_dir: Path) -> Counter:
    """Trial folders a run wrote (config.yaml at run start), counted per grid point."""
    counts: Counter = Counter()
    for config in (study_dir / "trials").glob("*/config.yaml"):
        resolved = yaml.safe_load(config.read_text())
        counts[(float(resolved["method"]["learning_rate"]), int(resolved["train"]["max_train_steps"]))] += 1
    return counts


def records(study_dir: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((study_dir / "trials").glob("*/metrics.json"))]


def complete_records(study_dir: Path) -> list[dict]:
    return [r for r in records(study_dir) if r.get("state") == "COMPLETE"]


def has_checkpoint(study_dir: Path) -> bool:
    """A milestone-sharing run has written its first milestone checkpoint (runs/<key>/step-<N>/)."""
    return any((study_dir / "runs").glob("*/step-*/state.json"))


def first_history_step(record: dict) -> int | None:
    steps = [h["step"] for h in record.get("history") or []]
    return min(steps) if steps else None


def assert_clean_exit(driver, code: int = 0) -> None:
    assert driver.wait(DRIVER_TIMEOUT) == code, driver.output()[-6000:]
    assert "Traceback" not in driver.output(), driver.output()[-6000:]


# ---- many drivers on one study ----------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("backend", ["sqlite", "journal", "postgresql"])
def test_three_drivers_with_two_workers_each_train_every_point_exactly_once(
    backend, tmp_path, drivers, request
):
    study_dir = tmp_path / "par"
    storage = None
    if backend == "journal":
        storage = str(tmp_path / "shared" / "study.journal")
    elif backend == "postgresql":
        storage = request.getfixturevalue("postgres_url")
    # No milestone sharing: 4 independent runs, so 6 workers really compete for them.
    args = sweep_args(tmp_path, "sweep.workers=2", "sweep.share_milestones=false")
    if storage:
        args.append(f"sweep.storage={storage}")
    started = [drivers.start(args, name=f"driver{i}") for i in range(3)]
    for driver in started:
        assert_clean_exit(driver)
    assert_grid_complete_once(study_dir, storage)
    trained = trained_folders(study_dir)
    assert trained == Counter(dict.fromkeys(GRID, 1)), f"runs trained per point: {trained}"
    # The baseline is evaluated once per study even though three drivers started together.
    assert (study_dir / "baseline" / "metrics.json").exists()
    baseline_runs = sum(
        1 for line in drivers.outputs().splitlines() if "evaluating the untuned base model" in line
    )
    assert baseline_runs <= 1, drivers.outputs()
    drivers.assert_no_leftovers()


# ---- SIGKILL of a driver ---------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("moment", ["baseline", "between_runs"])
def test_sigkilled_driver_leaves_no_process_and_a_rerun_finishes(moment, tmp_path, drivers):
    study_dir = tmp_path / "par"
    args = sweep_args(tmp_path, "sweep.workers=1")
    first = drivers.start(args, name="killed")
    if moment == "baseline":
        reached = lambda: (study_dir / "baseline").exists()  # noqa: E731
    else:  # the first run (one learning rate, both milestones) is recorded, the second not yet
        reached = lambda: len(complete_records(study_dir)) >= 2  # noqa: E731
    assert wait_until(lambda: reached() or not first.alive(), DRIVER_TIMEOUT), first.output()
    assert first.alive(), f"the sweep ended before the moment '{moment}':\n{first.output()}"
    first.send(signal.SIGKILL)  # the driver alone: its workers must notice and stop by themselves
    first.wait(30)
    drivers.assert_no_leftovers()
    again = drivers.start(args, name="rerun")
    assert_clean_exit(again)
    assert_grid_complete_once(study_dir)
    drivers.assert_no_leftovers()


@pytest.mark.slow
def test_a_driver_sigkilled_during_an_evaluation_fails_no_trial(tmp_path, drivers):
    """The worker is generating images when its driver dies: its next progress line meets a dead pipe.
    That must hand the run back (the trial is queued again), never fail the evaluation: a failed trial
    would be a decided grid point, lost to the re-run."""
    study_dir = tmp_path / "par"
    slow_eval = ["eval.num_images_per_prompt=4", "eval.num_inference_steps=25"]  # seconds per milestone
    args = sweep_args(tmp_path, "sweep.workers=1", *slow_eval)
    first = drivers.start(args, name="killed-during-eval")
    # The milestone checkpoint is written just before the milestone's evaluation starts.
    assert wait_until(lambda: has_checkpoint(study_dir) or not first.alive(), DRIVER_TIMEOUT)
    assert first.alive(), first.output()
    time.sleep(0.5)  # well inside the evaluation
    first.send(signal.SIGKILL)
    first.wait(30)
    drivers.assert_no_leftovers()
    failed = [
        t for t in load_trials(study_dir) if t.state.name == "FAIL" and not t.user_attrs.get("superseded")
    ]
    assert not failed, [t.user_attrs.get("fail_reason") for t in failed]
    again = drivers.start(args, name="rerun")
    assert_clean_exit(again)
    assert_grid_complete_once(study_dir)
    drivers.assert_no_leftovers()


@pytest.mark.slow
def test_a_run_of_a_sigkilled_driver_is_finished_from_its_checkpoint_by_another_driver(tmp_path, drivers):
    """Two drivers share the grid; one is killed mid-training; the other takes the run over when its
    heartbeat stops and resumes it from the milestone checkpoint (history starts after that step)."""
    study_dir = tmp_path / "par"
    args = sweep_args(tmp_path, "sweep.workers=1")
    victim = drivers.start(args, name="victim")
    assert wait_until(lambda: has_checkpoint(study_dir) or not victim.alive(), DRIVER_TIMEOUT)
    assert victim.alive(), victim.output()
    survivor = drivers.start(args, name="survivor")
    victim.send(signal.SIGKILL)
    victim.wait(30)
    assert_clean_exit(survivor)
    assert_grid_complete_once(study_dir)
    resumed = [r for r in complete_records(study_dir) if r.get("step") == max(STEPS)]
    starts = sorted(first_history_step(r) for r in resumed)
    assert min(STEPS) + 1 in starts, f"no run resumed from the step-{min(STEPS)} checkpoint: {starts}"
    drivers.assert_no_leftovers()


# ---- Ctrl-C and SIGTERM ----------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize(
    ("signum", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)], ids=["SIGINT", "SIGTERM"]
)
def test_interrupt_hands_the_run_back_and_a_rerun_completes_it(signum, code, tmp_path, drivers):
    study_dir = tmp_path / "par"
    args = sweep_args(tmp_path, "sweep.workers=1")
    first = drivers.start(args, name="interrupted")
    assert wait_until(lambda: has_checkpoint(study_dir) or not first.alive(), DRIVER_TIMEOUT)
    assert first.alive(), first.output()
    if signum == signal.SIGINT:
        import os

        os.killpg(first.pid, signum)  # Ctrl-C reaches the whole foreground process group
    else:
        first.send(signum)  # `kill <pid>` reaches the driver alone
    assert_clean_exit(first, code)
    # One line tells the user how to continue (trial lines may mention resuming too; this is the hint).
    resume_lines = [line for line in first.output().splitlines() if "to resume" in line.lower()]
    assert len(resume_lines) == 1, first.output()
    drivers.assert_no_leftovers()
    # Handed back, not failed for good: the re-run completes every point.
    again = drivers.start(args, name="rerun")
    assert_clean_exit(again)
    assert_grid_complete_once(study_dir)
    drivers.assert_no_leftovers()


@pytest.mark.slow
def test_an_impatient_double_ctrl_c_still_hands_every_run_back(tmp_path, drivers):
    """Ctrl-C twice in quick succession (the terminal's signal reaches driver and workers, the driver
    forwards it, and the user presses again): every run is still handed back, none is left RUNNING to be
    taken over later as crashed (which would cost it a retry), and there is no traceback."""
    import os

    study_dir = tmp_path / "par"
    args = sweep_args(tmp_path, "sweep.workers=2", "sweep.share_milestones=false", "train.train_batch_size=8")
    args += ["sweep.steps=[200,400]"]  # runs long enough that both workers are training when it comes
    first = drivers.start(args, name="double-ctrl-c")
    assert wait_until(lambda: len(running_trials(study_dir)) >= 2 or not first.alive(), DRIVER_TIMEOUT)
    assert first.alive(), first.output()
    os.killpg(first.pid, signal.SIGINT)
    time.sleep(0.3)
    os.killpg(first.pid, signal.SIGINT)
    assert_clean_exit(first, 130)
    drivers.assert_no_leftovers()
    trials = load_trials(study_dir)
    assert not [t.number for t in trials if t.state.name == "RUNNING"], "a run was left RUNNING"
    # Every stopped trial was handed back (queued again, no retry spent); lost claim races are not runs.
    lost_races = [t for t in trials if "another worker claimed" in str(t.user_attrs.get("fail_reason"))]
    stopped = [t for t in trials if t.state.name == "FAIL" and t not in lost_races]
    assert stopped and all(t.user_attrs.get("handed_back") for t in stopped), [t.user_attrs for t in stopped]
    assert not [t for t in trials if t.user_attrs.get("crashed")]


# ---- a second machine ------------------------------------------------------------------------------
@pytest.mark.slow
def test_a_driver_on_another_host_never_takes_over_a_live_run(tmp_path, drivers):
    """One long run (milestones 2 and 40) and two drivers started together, one calling itself 'other':
    whichever claims the run trains it start to finish; the other waits while it is live, never takes it."""
    study_dir = tmp_path / "par"
    long_steps = 40
    args = sweep_args(tmp_path, "sweep.workers=1") + [
        f"sweep.learning_rates=[{LEARNING_RATES[0]:g}]",
        f"sweep.steps=[2,{long_steps}]",
    ]
    here = drivers.start(args, name="this-host")
    other = drivers.start(args, name="other-host", env={"SDSWEEP_HOST": "other"})
    assert_clean_exit(here)
    assert_clean_exit(other)
    trials = load_trials(study_dir)
    complete = Counter(point_of(t) for t in trials if t.state.name == "COMPLETE")
    assert complete == Counter({(LEARNING_RATES[0], 2): 1, (LEARNING_RATES[0], long_steps): 1})
    # Trained once, start to finish, by its owner: no second set of folders, no resume.
    assert sum(trained_folders(study_dir).values()) == 2
    (final,) = [r for r in complete_records(study_dir) if r.get("step") == long_steps]
    assert first_history_step(final) == 1
    taken = [t for t in trials if "interrupt" in str(t.user_attrs.get("fail_reason", "")).lower()]
    assert not taken, [t.user_attrs for t in taken]
    drivers.assert_no_leftovers()


def running_trials(study_dir: Path) -> list[optuna.trial.FrozenTrial]:
    if not (study_dir / "study.db").exists():
        return []
    try:
        return [t for t in load_trials(study_dir) if t.state.name == "RUNNING"]
    except Exception:  # the study is still being created
        return []


@pytest.mark.slow
def test_a_machine_whose_clock_runs_ahead_never_takes_over_a_live_run(tmp_path, drivers):
    """Another host whose clock is 10 minutes ahead joins while a long run is live: by its clock the run's
    heartbeats are 10 minutes old, but it watches them change, so it never takes the run over."""
    study_dir = tmp_path / "par"
    long_steps = 300  # batch 8: tens of seconds, several grace periods, on the tiny model
    args = sweep_args(tmp_path, "sweep.workers=1", "sweep.share_milestones=false") + [
        f"sweep.learning_rates=[{LEARNING_RATES[0]:g}]",
        f"sweep.steps=[{long_steps}]",
        "train.train_batch_size=8",
    ]
    here = drivers.start(args, name="this-host")
    assert wait_until(lambda: running_trials(study_dir) or not here.alive(), DRIVER_TIMEOUT)
    assert here.alive(), here.output()
    ahead = drivers.start(
        args, name="clock-ahead", env={"SDSWEEP_HOST": "other", "SDSWEEP_CLOCK_OFFSET": "600"}
    )
    saw_it_live = wait_until(
        lambda: "1 running elsewhere" in ahead.output() or not here.alive(), DRIVER_TIMEOUT
    )
    watched_from = time.monotonic()
    assert_clean_exit(here)
    watched = time.monotonic() - watched_from
    assert_clean_exit(ahead)
    # The check means something only if the other host watched the live run for longer than the grace period.
    assert saw_it_live and "1 running elsewhere" in ahead.output(), ahead.output()[-4000:]
    assert watched > 4, f"the run ended {watched:.1f}s after the other host joined: lengthen it"
    trials = load_trials(study_dir)
    assert [point_of(t) for t in trials if t.state.name == "COMPLETE"] == [(LEARNING_RATES[0], long_steps)]
    assert not [t for t in trials if t.user_attrs.get("crashed")], [t.user_attrs for t in trials]
    (final,) = complete_records(study_dir)
    assert first_history_step(final) == 1  # trained start to finish by its first owner
    assert "taken over" not in here.output()
    drivers.assert_no_leftovers()


@pytest.mark.slow
def test_a_live_run_taken_over_by_mistake_stops_and_its_new_owner_finishes_it(tmp_path, drivers):
    """A process that believes a live run dead takes it over (here: the owner's clock is 100 s behind on
    the same host name, as with containers that share one); the first owner sees its trial taken and
    stops at its next step instead of training on beside the new owner, which finishes the point."""
    study_dir = tmp_path / "par"
    long_steps = 300
    args = sweep_args(tmp_path, "sweep.workers=1", "train.train_batch_size=8") + [
        f"sweep.learning_rates=[{LEARNING_RATES[0]:g}]",
        f"sweep.steps=[2,{long_steps}]",
    ]
    behind = drivers.start(args, name="clock-behind", env={"SDSWEEP_CLOCK_OFFSET": "-100"})
    assert wait_until(lambda: has_checkpoint(study_dir) or not behind.alive(), DRIVER_TIMEOUT)
    assert behind.alive(), behind.output()
    taker = drivers.start(args, name="taker")
    assert_clean_exit(taker)
    assert_clean_exit(behind)
    assert "taken over by another process" in behind.output(), behind.output()[-4000:]
    complete = Counter(point_of(t) for t in load_trials(study_dir) if t.state.name == "COMPLETE")
    assert complete == Counter({(LEARNING_RATES[0], 2): 1, (LEARNING_RATES[0], long_steps): 1})
    # The new owner resumed from the step-2 checkpoint; the first owner recorded no long trial.
    (final,) = [r for r in complete_records(study_dir) if r.get("step") == long_steps]
    assert first_history_step(final) == 3, first_history_step(final)
    assert f"steps={long_steps}]: COMPLETE" not in behind.output()
    drivers.assert_no_leftovers()


# ---- keep_best_k under a kill between record and tell ------------------------------------------------
@pytest.mark.slow
def test_keep_best_k_keeps_the_best_weights_after_a_kill_between_record_and_tell(tmp_path, drivers):
    from sdsweep.results.table import best_trial

    study_dir = tmp_path / "par"
    args = sweep_args(tmp_path, "sweep.keep_best_k=1", "sweep.isolation=inprocess")
    # Test-only fault hook: the process SIGKILLs itself after writing a trial's metrics.json, before
    # telling Optuna.
    faulty = drivers.start(args, name="faulty", env={"SDSWEEP_FAULT": "after_record"})
    assert faulty.wait(DRIVER_TIMEOUT) == -signal.SIGKILL, faulty.output()
    assert records(study_dir), "the fault hook fired before any record was written"
    again = drivers.start(args, name="rerun")
    assert_clean_exit(again)
    assert_grid_complete_once(study_dir)
    results = pd.read_csv(study_dir / "results.csv")
    best = best_trial(results, "maximize", feasible_only=False)
    assert best is not None
    best_dir = study_dir / best["trial_dir"]  # results.csv paths are relative to the study folder
    assert (best_dir / "weights").is_dir() and any((best_dir / "weights").iterdir())
    assert json.loads((best_dir / "metrics.json").read_text()).get("weights")
    kept = [d for d in (study_dir / "trials").iterdir() if (d / "weights").is_dir()]
    assert kept == [best_dir], f"weights kept: {kept}, best: {best_dir}"
    # Killed saves leave no staging folders behind.
    assert not [p for p in (study_dir / "trials").rglob("*") if p.is_dir() and "staging" in p.name]
    drivers.assert_no_leftovers()


# ---- the PostgreSQL fixture itself -------------------------------------------------------------------
def test_postgres_fixture_serves_concurrent_optuna_workers(postgres_url):
    """The throwaway server works as shared storage: two threads, one study, every trial recorded."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(study_name="fixture", storage=postgres_url)

    def work() -> None:
        mine = optuna.load_study(study_name="fixture", storage=postgres_url)
        mine.optimize(lambda t: t.suggest_float("x", 0, 1) ** 2, n_trials=3)

    threads = [threading.Thread(target=work) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert [t.state.name for t in study.trials] == ["COMPLETE"] * 6
    assert len({t.number for t in study.trials}) == 6


# ---- what a worker pool costs (in-process pieces of the pool's fast paths) -------------------------------
def test_with_several_workers_the_longest_run_is_claimed_first(tmp_path):
    """Longest run first: 4 runs of 2/4/2/4 steps on 2 workers take 6 steps of wall time, not 8."""
    from sdsweep.sweep.engine import SweepEngine

    engine = SweepEngine(sweep_args(tmp_path, "sweep.workers=2", "sweep.share_milestones=false"))
    first, second = engine.next_run(), engine.next_run()
    assert [first.slots[0].step, second.slots[0].step] == [max(STEPS), max(STEPS)]
    assert {first.slots[0].params[LR_KEY], second.slots[0].params[LR_KEY]} == set(LEARNING_RATES)
    one = SweepEngine(sweep_args(tmp_path, "sweep.share_milestones=false", study="one"))
    assert one.next_run().slots[0].step == min(STEPS), "one worker keeps the grid's order"


def test_an_idle_worker_wakes_when_a_run_ends_not_after_its_poll_interval(tmp_path):
    from sdsweep.sweep.engine import SweepEngine

    waiting = SweepEngine(sweep_args(tmp_path))
    finisher = SweepEngine(sweep_args(tmp_path))
    timer = threading.Timer(0.3, finisher.nudge)  # what a process does when it has finished a run
    started = time.monotonic()
    timer.start()
    waiting.idle_wait(20.0)
    assert time.monotonic() - started < 5.0
    started = time.monotonic()
    waiting.idle_wait(0.5)  # no run ended: it waits the whole interval
    assert time.monotonic() - started >= 0.5
