"""The command a user runs: ``run_sweep`` joins the study, runs the worker pool (or one in-process engine),
then writes the results table, builds the report, logs the study to tracking and says how it ended.

The claim/run loop itself is ``SweepEngine`` (sdsweep/sweep/engine.py), which workers run too; only the
driver prints the closing line and builds the report, once for all workers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sdsweep import signals
from sdsweep.config.schema import Config, SweepConfig
from sdsweep.errors import ConfigError, SweepStopped
from sdsweep.results.study_folder import best_trial, study_verdict
from sdsweep.results.verdict import Verdict
from sdsweep.study.trial_tags import CLAIM_LOST, Fate, TrialTags
from sdsweep.sweep.engine import SweepEngine, log
from sdsweep.sweep.fingerprint import ensure_study_identity


@dataclass
class SweepOutcome:
    study_dir: Path
    results_csv: Path
    states: dict[str, int] = field(default_factory=dict)
    runs_launched: int = 0
    trials_launched: int = 0
    finished: bool = False
    best: dict[str, Any] | None = None
    verdict: Verdict | None = None  # how sure the study is of ``best`` (sdsweep.results.verdict)


class SweepDriver:
    """The command a user runs: joins the study, runs the pool (or one in-process loop), reports."""

    def __init__(self, overrides: list[str], cfg: Config | None = None):
        # cfg: the sweep's config when the caller built it (run_config.build_config); else built here.
        self.engine = SweepEngine(overrides, cfg, label="driver")
        self.overrides = self.engine.overrides
        self.cfg: Config = self.engine.cfg
        self.sweep: SweepConfig = self.engine.sweep
        self.paths = self.engine.paths
        self.storage = self.engine.storage
        self.study = self.engine.study
        self.outcome = SweepOutcome(self.paths.root, self.paths.results_csv)

    # ---- the loop ---------------------------------------------------------------------------------
    def run(self) -> SweepOutcome:
        if self.sweep.isolation == "inprocess":
            import gc

            from sdsweep.sweep import preload  # noqa: F401  (the libraries runs need, imported once)

            # What lives now (libraries, caches) outlives every run: freeze it once, so each run's
            # collection (release_memory) scans only what that run allocated (~0.3 s each otherwise).
            gc.collect()
            gc.freeze()
        previous = signals.install()
        try:
            # study.json is written once with the study's fingerprint; a changed setup stops here.
            ensure_study_identity(self.cfg, self.paths, self.overrides)
            if self.sweep.isolation == "inprocess":
                try:
                    self.engine.ensure_baseline()
                except (signals.HandBack, ConfigError):
                    raise
                except Exception as error:  # as a pool worker reports it: one line, no traceback
                    raise SweepStopped(
                        f"the baseline evaluation failed: {type(error).__name__}: {error}"
                    ) from error
                self.engine.work()
                self.outcome.runs_launched = self.engine.runs_launched
                self.outcome.trials_launched = self.engine.trials_launched
            else:
                from sdsweep.sweep.pool import WorkerPool

                pool = WorkerPool(self.engine)
                pool.run()
                self.outcome.runs_launched, self.outcome.trials_launched = pool.launched()
                self.engine.stop_message = self.engine.why_stopped()
                if self.engine.stop_message:
                    log(self.engine.stop_message)
        except signals.HandBack as stop:
            # Leaving now: a further Ctrl-C (an impatient user) must not interrupt the exit itself, whose
            # clean-up (W&B, the fork server) would then die by the signal, with a traceback.
            previous = signals.ignore_stops()
            log(
                f"stopped by {stop}: its runs were handed back; re-run the same command to resume from their checkpoints"
            )
            raise SystemExit(stop.exit_code) from None
        finally:
            signals.restore(previous)
        self.outcome.finished = self.engine.is_finished()
        return self.finish()

    def finish(self) -> SweepOutcome:
        frame = self.engine.publish_results()
        states = frame["state"].value_counts().to_dict() if "state" in frame else {}
        self.outcome.states = {str(k): int(v) for k, v in states.items()}
        counts = self.outcome.states
        log(
            f"{sum(counts.get(k, 0) for k in ('COMPLETE', 'FAIL', 'PRUNED'))} finished ({counts.get('COMPLETE', 0)} complete, {counts.get('FAIL', 0)} failed, "
            f"{counts.get('PRUNED', 0)} pruned)" + self.lost_claims_note()
        )
        self.outcome.best = best_trial(frame, self.sweep.objectives)
        self.outcome.verdict = study_verdict(self.paths.root, frame)
        self.track_study(frame)
        return self.outcome

    def lost_claims_note(self) -> str:
        """Lost claim races are FAIL in Optuna (study/store.py, CLAIM_LOST) but failures of nothing: say so."""
        lost = sum(1 for t in self.engine.handle.trials() if TrialTags.of(t).fate == Fate.CLAIM_LOST)
        if not lost:
            return ""
        return (
            f"; {lost} lost claim race(s) are left out: nothing ran, and Optuna tools list them as FAIL "
            f"with user attribute {CLAIM_LOST}=true"
        )

    def track_study(self, frame) -> None:
        """Build the local report, then hand its plots and the trial table to the study-level W&B run."""
        import pandas as pd

        from sdsweep.results import report
        from sdsweep.results.table import baseline_row
        from sdsweep.sweep import tracking

        plots: dict[str, Path] = {}
        try:
            if self.sweep.build_report:
                html, _ = report.build_report(self.paths.root)
                plots = report.report_plots(self.paths.root)
                log(f"report: {html}")
        except Exception as error:  # the report is a convenience; results.csv is the record
            log(f"warning: report not built ({type(error).__name__}: {error})")
        base = baseline_row(self.paths)
        table = pd.concat([pd.DataFrame([base]), frame], ignore_index=True) if base is not None else frame
        try:
            tracking.record_study(self.cfg, self.cfg.study, table, plots, self.paths.wandb)
        except Exception as error:  # tracking never fails a sweep
            log(f"warning: study-level tracking failed ({error})")


def run_sweep(overrides: list[str], cfg: Config | None = None) -> SweepOutcome:
    return SweepDriver(overrides, cfg).run()
