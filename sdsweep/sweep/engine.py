"""The sweep: one Optuna study per ``study`` name, shared by every worker on every machine, resumable.

``SweepEngine`` plans from the storage and claims one training run at a time (sdsweep/sweep/claims.py);
it runs inside the driver (``sweep.isolation=inprocess``) or inside each long-lived worker of the
pool (sdsweep/sweep/pool.py). The grid is planned again every time a worker looks for work, so drivers on
other machines that join the study simply take the runs nobody holds. Re-running the same command
continues the study: runs whose heartbeat stopped are taken over and resume from their checkpoint,
finished grid points are never re-run, and a finished grid is reported as finished.
"""

from __future__ import annotations

import time
import uuid

from optuna.trial import TrialState

from sdsweep import io, signals
from sdsweep.config.compose import user_overrides
from sdsweep.config.load import to_yaml
from sdsweep.config.schema import Config, SweepConfig
from sdsweep.results.table import write_results
from sdsweep.study.plan import STEP_KEY, RunPlan, overrides_for, short_params
from sdsweep.study.store import StudyHandle, storage_url
from sdsweep.sweep.baseline import ensure_baseline
from sdsweep.sweep.claimer import AGAIN, WAIT, Claimer
from sdsweep.sweep.claims import Claims, Heartbeat, RunTakenOver, host_name
from sdsweep.sweep.fingerprint import StudyMismatchError, check_study_unchanged
from sdsweep.sweep.grid_claims import GridClaims
from sdsweep.sweep.ledger import StudyLedger
from sdsweep.sweep.run_config import build_config
from sdsweep.sweep.run_executor import execute_run
from sdsweep.sweep.run_setup import RunCaches
from sdsweep.sweep.run_spec import RunSpec, TrialSlot
from sdsweep.sweep.search import SearchClaims
from sdsweep.sweep.wake import WakeFile


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
        # One claimer per sampler kind, behind one protocol (sweep/claimer.py).
        self.claimer: Claimer = (
            GridClaims(self.cfg, self.overrides, self.handle, self.claims, self.ledger, self.say, label)
            if self.sweep.sampler == "grid"
            else SearchClaims(self.cfg, self.handle, self.claims, self.ledger, self.say)
        )
        self.wake = WakeFile(self.paths.runs)
        # When the sweep started (unix time): the driver's start, for its workers too, so sweep.timeout
        # bounds the whole sweep, not each worker (a replacement worker starts later).
        self.started_at = time.time() if started_at is None else started_at
        self.stop_message: str | None = None
        self.runs_launched = 0
        self.trials_launched = 0

    def say(self, message: str) -> None:
        log(f"{self.label}: {message}" if self.label != "driver" else message)

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
            answer = self.claimer.next_claim()
            if isinstance(answer, tuple):
                answer = self.spec_for(*answer)
            if answer == WAIT:
                self.wake.wait(min(self.sweep.heartbeat_interval, 2.0))
            elif answer != AGAIN:
                return answer

    def timed_out(self) -> bool:
        return self.sweep.timeout is not None and time.time() - self.started_at > self.sweep.timeout

    def idle_wait(self, seconds: float) -> None:
        """Wait while others hold the rest, waking when a process of this study folder finishes a run."""
        self.wake.wait(seconds)

    def nudge(self) -> None:
        """Tell processes waiting in ``idle_wait`` on this machine that the study changed."""
        self.wake.touch()

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
        return not self.stop_message and self.claimer.finished()

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
        self.claimer.ran(len(slots))
