"""The sweep: one Optuna study per ``study`` name, shared by every worker on every machine, resumable.

``SweepEngine`` plans from the storage and claims one training run at a time (sdsweep/sweep/claims.py);
it runs inside the driver (``sweep.isolation=inprocess``) or inside each long-lived worker of the
pool (sdsweep/sweep/pool.py). The grid is planned again every time a worker looks for work, so drivers on
other machines that join the study simply take the runs nobody holds. Re-running the same command
continues the study: runs whose heartbeat stopped are taken over and resume from their checkpoint,
finished grid points are never re-run, and a finished grid is reported as finished.
"""

from __future__ import annotations

import hashlib
import time
import uuid
from pathlib import Path
from typing import Any

from optuna.distributions import CategoricalDistribution
from optuna.trial import TrialState

from sdsweep import io, signals
from sdsweep.config.compose import user_overrides
from sdsweep.config.load import to_yaml
from sdsweep.config.schema import Config, SweepConfig
from sdsweep.progress import Progress
from sdsweep.results.table import write_results
from sdsweep.study.plan import (
    STEP_KEY,
    RunPlan,
    canonical,
    command_line_values,
    grid_points,
    overrides_for,
    plan_runs,
    point_key,
    short_params,
)
from sdsweep.study.store import StudyHandle, storage_url
from sdsweep.study.trial_tags import TrialTags
from sdsweep.sweep.baseline import ensure_baseline
from sdsweep.sweep.claims import Claims, Heartbeat, RunTakenOver, host_name
from sdsweep.sweep.fingerprint import StudyMismatchError, check_study_unchanged, is_location_only
from sdsweep.sweep.ledger import StudyLedger
from sdsweep.sweep.run_config import build_config
from sdsweep.sweep.run_executor import execute_run
from sdsweep.sweep.run_setup import RunCaches
from sdsweep.sweep.run_spec import RunSpec, TrialSlot
from sdsweep.sweep.search import AGAIN, DEFAULT_SEARCH_TRIALS, WAIT, SearchClaims

WAKE_FILE = ".wake"  # under runs/: touched when a run ends, so idle workers re-check at once


def _stamp(path: Path) -> int | None:
    try:
        return path.stat().st_mtime_ns
    except OSError:
        return None


def log(message: str) -> None:
    print(f"[sdsweep] {message}", flush=True)


class SweepEngine:
    """Plan from the storage, claim a run, execute it, repeat; one per process that trains."""

    def __init__(
        self,
        overrides: list[str],
        cfg: Config | None = None,
        label: str = "driver",
        token: str | None = None,
        retry_below: int | None = None,
        started_at: float | None = None,
    ):
        self.overrides = user_overrides(list(overrides))
        # The sweep's own config, built once (run_config.build_config) by whoever starts the sweep and
        # handed down (a pool worker reads it from the pool's job file); nothing changes it afterwards.
        self.cfg: Config = build_config(self.overrides) if cfg is None else cfg
        self.sweep: SweepConfig = self.cfg.sweep
        self.config_yaml = to_yaml(self.cfg)
        self.paths = io.StudyPaths.of(self.cfg.paths.root, self.cfg.study)
        self.paths.root.mkdir(parents=True, exist_ok=True)
        self.storage = storage_url(self.cfg, self.paths.root)
        self.handle = StudyHandle(self.cfg, self.storage, self.cfg.study)
        self.study = self.handle.study
        self.label = label
        self.token = token or uuid.uuid4().hex[:8]
        self.claims = Claims(self.handle, self.sweep, f"{host_name()} {label} [{self.token}]", self.token)
        self.heartbeat: Heartbeat | None = None
        self.caches = RunCaches()  # evaluator and memory estimates, reused by this process's next runs
        self.retry_below = len(self.handle.trials()) if retry_below is None else retry_below
        self.ledger = StudyLedger(self.handle, self.sweep, self.claims, self.retry_below)
        self.search = SearchClaims(self.cfg, self.handle, self.claims, self.ledger, self.say)
        # When the sweep started (unix time): the driver's start, for its workers too, so sweep.timeout
        # bounds the whole sweep, not each worker (a replacement worker starts later).
        self.started_at = time.time() if started_at is None else started_at
        self.overall: Progress | None = None  # points done of those this process found pending
        self.announced = False
        self.stop_message: str | None = None
        self.runs_launched = 0
        self.trials_launched = 0
        # A single run is identified by its whole config, so changing any value runs again.
        self.single_key = None
        self.single_params: dict[str, Any] = {}
        if self.sweep.name == "single":
            self.single_key = self.single_run_key()
            # What the user set on the command line (e.g. each job of a Hydra -m multirun) is what tells
            # single runs apart: it becomes the trial's parameters in results and the report.
            self.single_params = command_line_values(self.overrides)

    def single_run_key(self) -> str:
        """A single run's identity: its whole config except where things are (the study's fingerprint
        checks what the data and model folders hold). A study started by an older sdsweep keeps the key
        it gave its run (that one hashed the paths too), so the run is not trained again."""
        import json

        from sdsweep.config.load import to_yaml
        from sdsweep.config.resolve import flatten

        kept = {k: v for k, v in flatten(self.cfg).items() if not is_location_only(k)}
        key = (
            "single:" + hashlib.sha1(json.dumps(kept, sort_keys=True, default=str).encode()).hexdigest()[:12]
        )
        legacy = "single:" + hashlib.sha1(to_yaml(self.cfg).encode()).hexdigest()[:12]
        known = set(self.ledger.decided_points()) | self.ledger.live_points()
        return legacy if legacy in known and key not in known else key

    def say(self, message: str) -> None:
        log(f"{self.label}: {message}" if self.label != "driver" else message)

    def key_of(self, point: dict[str, Any]) -> str:
        return self.single_key if self.single_key and not point else point_key(point)

    # ---- claiming ---------------------------------------------------------------------------------
    def next_run(self) -> RunSpec | None:
        """Claim the next run for this process; None when the study needs nothing more from it."""
        # Data edited (or conf/ changed) while the sweep runs: stop before training anything not comparable.
        check_study_unchanged(self.cfg, self.paths)
        while True:
            if self.timed_out():
                self.stop_message = (
                    f"sweep.timeout={self.sweep.timeout:g}s reached; re-run the same command to continue"
                )
                return None
            if self.ledger.config_failure():
                self.stop_message = self.why_stopped()
                return None
            reaped = self.claims.reap_stale()
            if reaped:
                self.say(f"resuming: {reaped} interrupted trial(s) whose heartbeat stopped are taken over")
            answer = self.claim_grid() if self.sweep.sampler == "grid" else self.claim_search()
            if answer == WAIT:
                self.idle_wait(min(self.sweep.heartbeat_interval, 2.0))
            elif answer != AGAIN:
                return answer

    def timed_out(self) -> bool:
        return self.sweep.timeout is not None and time.time() - self.started_at > self.sweep.timeout

    def idle_wait(self, seconds: float) -> None:
        """Wait while others hold the rest, but wake as soon as a process of this study folder finishes a run
        (it touches the wake file): a worker waiting for its peer's last run then exits with it, not seconds later.
        A stat every 0.1 s costs nothing; re-reading the study that often would."""
        wake = self.paths.runs / WAKE_FILE
        before = _stamp(wake)
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            time.sleep(0.1)
            if _stamp(wake) != before:
                return

    def nudge(self) -> None:
        """Tell processes waiting in ``idle_wait`` on this machine that the study changed."""
        try:
            self.paths.runs.mkdir(parents=True, exist_ok=True)
            (self.paths.runs / WAKE_FILE).touch()
        except OSError:
            pass  # only a hint: waiting processes re-read the study on their own within seconds

    def params_of(self, point: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        params, distributions = {}, {}
        for key, spec in self.sweep.params.items():
            if key in point:
                value = canonical(point[key])
                choices = [canonical(c) for c in spec.choices] if spec.choices else [value]
                params[key], distributions[key] = value, CategoricalDistribution(choices)
        return params, distributions

    def new_trial(self, point: dict[str, Any], run: RunPlan, ticket: bool) -> TrialSlot:
        params, distributions = self.params_of(point)
        tags = TrialTags(grid_point=self.key_of(point), run_key=run.key, ticket=ticket)
        number = self.claims.create_ticket(params, distributions, tags)
        step = int(point.get(STEP_KEY, self.cfg.train.max_train_steps))
        shown = point or self.single_params  # a single run plans no point; record what set it apart
        return TrialSlot(number=number, trial_id=self.handle.trial_id(number), step=step, params=shown)

    def claim_grid(self) -> RunSpec | str | None:
        points = grid_points(self.sweep.params) if self.sweep.params else [{}]
        decided = self.ledger.decided_points()
        live = self.ledger.live_points()
        pending = [p for p in points if self.key_of(p) not in decided and self.key_of(p) not in live]
        if self.sweep.n_trials is not None:
            pending = pending[: max(0, self.sweep.n_trials - len(decided) - len(live))]
        if not pending:
            if live:
                if not self.announced:
                    self.announced = True
                    self.say(
                        f"study '{self.cfg.study}': {len(points)} grid points, {len(decided)} already done, "
                        f"{len(live)} running elsewhere, none left to claim; waiting while they run, to take "
                        "over any whose heartbeat stops"
                    )
                return WAIT  # the rest is being trained elsewhere; wait in case its worker dies
            if not self.announced:
                log(f"grid finished: all {len(points)} grid points have results; nothing to run")
            return None
        runs = plan_runs(pending, self.cfg, self.sweep.share_milestones)
        if self.sweep.workers != 1:
            # Longest run first when runs go side by side: short runs then fill the tail, instead of one
            # long run left alone at the end (4 runs of 20/40/20/40 steps on 2 workers: 60 steps, not 80).
            runs.sort(
                key=lambda run: -max(int(p.get(STEP_KEY, self.cfg.train.max_train_steps)) for p in run.points)
            )
        if not self.announced:
            self.announced = True
            self.overall = Progress(
                f"sweep {self.cfg.study} ({self.label})", len(pending), "points", lines_only=True
            )
            self.say(
                f"study '{self.cfg.study}': {len(points)} grid points, {len(decided)} already done, "
                f"{len(live)} running elsewhere, {len(pending)} to run in {len(runs)} training run(s)"
            )
        for run in runs:
            slots = self.claim(run)
            if slots:
                return self.spec_for(run, slots)
        return AGAIN  # every run was claimed by someone else meanwhile: plan again

    def claim(self, run: RunPlan) -> list[TrialSlot] | None:
        """The run's trials, created RUNNING as ours; None when another process holds the run.

        A claim is made whole, uninterrupted: a Ctrl-C that arrives meanwhile is raised once the trials
        exist, and ``work`` hands them back, so none is left RUNNING to be taken over later as crashed.
        """
        with signals.critical():
            keys = {self.key_of(p) for p in run.points}
            first = self.new_trial(run.points[0], run, ticket=True)
            if not self.claims.won(first.number, run.key, keys, set(self.ledger.decided_points())):
                self.claims.lose(first.number)
                return None
            return [first] + [self.new_trial(p, run, ticket=False) for p in run.points[1:]]

    def claim_search(self) -> RunSpec | str | None:
        answer = self.search.next_claim()
        return self.spec_for(*answer) if isinstance(answer, tuple) else answer

    def spec_for(self, run: RunPlan, slots: list[TrialSlot]) -> RunSpec | str:
        """The claimed run's spec, with its config built here, once (AGAIN when the config is invalid: its
        trials fail for good with the error, and the next claim is planned)."""
        overrides = self.overrides + overrides_for(run.base if run.shared else run.points[0])
        if run.shared:
            overrides.append(f"{STEP_KEY}={max(s.step for s in slots)}")
        try:
            # No override of its own (a single run, a grid of one point): the sweep's config is the run's.
            config = self.config_yaml if overrides == self.overrides else to_yaml(build_config(overrides))
        except Exception as error:  # a point whose values do not make a valid config
            reason = f"{type(error).__name__}: {error}"
            self.say(f"run {run.key}: its config is invalid, trials fail: {reason}")
            self.claims.refuse([s.number for s in slots], reason, error)
            self.nudge()
            return AGAIN
        report_every = 0
        if self.sweep.pruner not in ("none", "wilcoxon") and not run.shared:  # wilcoxon judges evaluations
            report_every = max(1, max(s.step for s in slots) // 4)
        return RunSpec(
            kind="train",
            study=self.cfg.study,
            study_root=str(self.paths.root.resolve()),
            storage=self.storage,
            overrides=overrides,
            config=config,
            run_key=run.key,
            slots=slots,
            shared=run.shared,
            report_every=report_every,
        )

    # ---- executing ----------------------------------------------------------------------------------
    def ensure_baseline(self) -> None:
        """Evaluate the untuned model once per study folder, before this process trains."""
        ensure_baseline(self.cfg, self.paths, self.overrides, self.storage, self.caches, self.say)

    def is_finished(self) -> bool:
        """Every grid point (or n_trials of them, or the search target) has a result that stands."""
        if self.stop_message:
            return False
        decided = self.ledger.decided_points()
        if self.sweep.sampler != "grid":
            return sum(len(v) for v in decided.values()) >= (self.sweep.n_trials or DEFAULT_SEARCH_TRIALS)
        points = grid_points(self.sweep.params) if self.sweep.params else [{}]
        done = sum(1 for p in points if self.key_of(p) in decided)
        return done >= min(len(points), self.sweep.n_trials or len(points))

    def work(self) -> None:
        """Claim -> run -> claim ... until the study needs nothing more from this process."""
        if self.heartbeat is None:
            self.heartbeat = Heartbeat(self.handle, self.sweep.heartbeat_interval)
        try:
            while (spec := self.next_run()) is not None:
                self.run_one(spec)
        except signals.HandBack as stop:
            # Whatever this process still holds (a claim made just before the stop, between claiming and
            # training) goes back too; run_one has already handed back the run it was training.
            with signals.critical():
                held = [t.number for t in self.claims.running_of_token(self.token)]
                self.claims.hand_back(held, f"{stop} received")
            raise
        finally:
            self.heartbeat.stop()
            self.heartbeat = None
        if self.stop_message and self.label == "driver":  # a pool's driver says it once for all workers
            self.say(self.stop_message)

    def why_stopped(self) -> str | None:
        """After the pool: the reason the workers stopped early, if any (said once, by the driver)."""
        reason = self.ledger.config_failure()
        if reason:
            return (
                f"stopping: the first {self.sweep.stop_after_failures} trials all failed with a configuration "
                f"error ({reason[:300]}); fix it and re-run the same command"
            )
        if self.timed_out():
            return f"sweep.timeout={self.sweep.timeout:g}s reached; re-run the same command to continue"
        return None

    def run_one(self, spec: RunSpec) -> None:
        slots = spec.slots
        what = (
            f"milestones {'/'.join(str(s.step) for s in slots)}" if spec.shared else f"{slots[0].step} steps"
        )
        numbers = [s.number for s in slots]
        params = {k: v for k, v in slots[0].params.items() if not (spec.shared and k == STEP_KEY)}
        self.say(
            f"run {short_params(params) or 'config as given'} ({what}), "
            f"trial{'s' if len(numbers) > 1 else ''} {', '.join(map(str, numbers))}"
        )
        assert self.heartbeat is not None
        self.heartbeat.watch(numbers)
        try:
            execute_run(
                spec,
                self.caches,
                still_owned=self.heartbeat.check_owned,
                say=self.say,
                label=self.label,
                handle=self.handle,
            )
        except (signals.HandBack, StudyMismatchError) as stop:
            # Uninterruptible: a second signal (the driver forwards the Ctrl-C the terminal already sent
            # us, or an impatient user) must not leave trials RUNNING, to be taken over later as crashed.
            # Data changed before the run loaded it: handed back too, and the sweep stops (not comparable).
            signalled = isinstance(stop, signals.HandBack)
            with signals.critical():
                left = [n for n in numbers if self.handle.get_trial(n).state == TrialState.RUNNING]
                self.claims.hand_back(left, f"{stop} received" if signalled else "the study's data changed")
            raise
        except RunTakenOver as lost:
            self.say(f"run {spec.run_key}: {lost}")
            return
        finally:
            self.heartbeat.watch([])
        self.runs_launched += 1
        self.trials_launched += len(slots)
        self.after_run(slots)

    def publish_results(self):
        """results.csv/.parquet from a fresh read of the study, under a lock shared by every process of the
        study folder: of several writing at once, the last to write has read the most (without the lock a
        slower writer could replace a newer table with its older snapshot)."""
        with io.file_lock(self.paths.root / ".results.lock"):
            return write_results(self.paths, self.handle.trials(), self.ledger.superseded())

    def after_run(self, slots: list[TrialSlot]) -> None:
        # Each trial's result line was said when its milestone was recorded (RunExecutor.finish_slot).
        self.publish_results()
        self.nudge()
        if self.overall is not None:
            self.overall.advance(len(slots))
