"""Racing the contenders: re-evaluate the trials the verdict cannot tell apart, with fresh shared units.

Contenders are the best trial, the trials tied with it and the trials uncertain on a constraint
(``Verdict.contenders``). Round r evaluates every contender (and the baseline) on the same new units:
``eval.seed + 1000*r``, so comparisons stay paired. Each round's rows are appended to the trial's
``units.csv`` and its metrics, intervals and feasibility are recomputed from the whole table.

Work is shared through claim files, ``confirm/r<round>/t<trial>.claim`` (created exclusively, refreshed
by a heartbeat, taken over when older than the grace period); an item is done when its table holds rows
of that round, so a killed worker loses nothing and a re-run resumes.
"""

from __future__ import annotations

import dataclasses
import json
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from sdsweep import io, signals
from sdsweep.config.constraints import parse_constraint
from sdsweep.evaluation.units import lpips_key_of, read_units, summarize, write_units
from sdsweep.results.study_folder import load_study, read_baseline_metrics
from sdsweep.study.record import TrialRecord, read_record
from sdsweep.sweep.claims import host_name

CONFIRM_DIR = "confirm"
STATE_FILE = "state.json"
EVENTS_FILE = "events.log"  # one line per round's rows appended: who evaluated what
BASELINE = "baseline"
SEED_STRIDE = 1000  # round r samples with eval.seed + 1000*r: fresh noise, the same for every contender


@dataclass
class Options:
    study_dir: Path
    budget: int | None = None  # images per trial (unit rows); None: 4x the study's own evaluation
    per_round: int | None = None  # images per prompt each round; None: the study's eval.num_images_per_prompt
    max_rounds: int | None = None
    grace: float = 60.0  # seconds before a silent claim is taken over
    device: str = "auto"


def stop_reason(
    contenders: list[int],
    images: dict[int, int],
    budget: int,
    rounds_done: int,
    max_rounds: int | None,
    uncertain: set[int] | frozenset[int] = frozenset(),
) -> str | None:
    """Why racing stops before the next round, or None to go on. ``contenders`` come from the latest
    verdict (the best, its ties, the uncertain); ``images`` is the unit rows each trial has so far;
    ``uncertain`` are the contenders whose interval straddles a constraint's threshold. A lone contender
    is still raced while it is uncertain: the pick itself may be infeasible (build 3 of the shapes world
    once picked a drifted trial, uncertain on the drift guard, and stopped because its rivals had no
    weights left)."""
    if len(contenders) <= 1 and not set(contenders) & set(uncertain):
        return "the best is separated and no contender with weights is uncertain"
    if all(images.get(t, 0) >= budget for t in contenders):
        return f"every contender reached the budget of {budget} images"
    if max_rounds is not None and rounds_done >= max_rounds:
        return f"--max-rounds {max_rounds} reached"
    return None


def why_contender(verdict, trial: int) -> str:
    reasons = ["the best"] if trial == verdict.best else []
    if trial in verdict.tied:
        reasons.append("tied with the best")
    if trial in verdict.uncertain:
        reasons.append("uncertain on " + ", ".join(verdict.uncertain[trial]))
    return "; ".join(reasons)


# ---- claims ------------------------------------------------------------------------------------------------
class ClaimBook:
    """Exclusive claim files with a heartbeat; a claim older than ``grace`` is taken over."""

    def __init__(self, folder: Path, grace: float, say):
        self.folder, self.grace, self.say = folder, grace, say
        self.owner = f"{host_name()}:{os.getpid()}"
        self.owned: set[Path] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="sdsweep-confirm-heartbeat", daemon=True)
        self._thread.start()

    def try_claim(self, path: Path) -> bool:
        path.parent.mkdir(parents=True, exist_ok=True)
        with io.file_lock(self.folder / ".claims.lock"):  # a takeover and a fresh claim never interleave
            try:
                age = time.time() - path.stat().st_mtime
            except FileNotFoundError:
                age = None
            if age is not None:
                if age < self.grace:
                    return False
                holder = (io.read_json_or_none(path) or {}).get("owner", "?")
                self.say(f"taking over {path.parent.name}/{path.name} from {holder} (silent {age:.0f} s)")
                path.unlink(missing_ok=True)
            payload = {"owner": self.owner, "host": host_name(), "pid": os.getpid(), "since": time.time()}
            won = io.create_exclusive_json(path, payload)
        if won:
            self.owned.add(path)
        return won

    def mine(self, path: Path) -> bool:
        return (io.read_json_or_none(path) or {}).get("owner") == self.owner

    def release(self, path: Path) -> None:
        self.owned.discard(path)
        with io.file_lock(self.folder / ".claims.lock"):
            if self.mine(path):
                path.unlink(missing_ok=True)

    def release_all(self) -> None:
        for path in list(self.owned):
            self.release(path)

    def close(self) -> None:
        self._stop.set()
        self.release_all()

    def _beat(self) -> None:
        while not self._stop.wait(max(min(self.grace / 4, 5.0), 0.1)):
            for path in list(self.owned):
                try:
                    os.utime(path)
                except OSError:
                    pass


# ---- one work item -----------------------------------------------------------------------------------------
def item_folder(paths: io.StudyPaths, item: int | str) -> Path:
    return paths.baseline if item == BASELINE else paths.trial(int(item))


def round_done(folder: Path, round_number: int) -> bool:
    try:
        table = read_units(folder)
    except io.DamagedFileError:
        return False
    return table is not None and "round" in table and bool((table["round"] == round_number).any())


def evaluate_item(
    paths: io.StudyPaths, item: int | str, round_number: int, opts: Options, caches
) -> pd.DataFrame:
    """The unit rows of one contender (or the baseline) on round ``round_number``'s fresh units."""
    from sdsweep.config.load import load_yaml
    from sdsweep.models.loading import select_device
    from sdsweep.sweep.run_setup import evaluation_setup, release_memory, untuned_pipeline
    from sdsweep.training.methods import load_trained_pipeline

    folder = item_folder(paths, item)
    cfg = load_yaml(str(folder / io.TRIAL_CONFIG))
    ev = cfg.eval
    fresh = dataclasses.replace(
        ev,
        seed=ev.seed + SEED_STRIDE * round_number,
        num_images_per_prompt=opts.per_round or ev.num_images_per_prompt,
    )
    cfg = dataclasses.replace(cfg, eval=fresh)
    device = select_device(opts.device)
    evaluator = evaluation_setup(cfg, paths, caches, device)
    if item == BASELINE:
        pipeline = untuned_pipeline(cfg, paths, device)
    else:
        record = read_record(folder / io.TRIAL_METRICS)
        pipeline = load_trained_pipeline(cfg, folder / str(record.weights), device, ev.scheduler)
    label = f"confirm round {round_number} {'baseline' if item == BASELINE else f'trial {item}'}"
    result = evaluator.evaluate(pipeline, out_dir=None, label=label, round_number=round_number)
    del pipeline
    release_memory()
    if result.units is None:
        raise RuntimeError(f"{label}: no images ({'; '.join(result.warnings) or 'generation failed'})")
    return result.units


def append_round(paths: io.StudyPaths, item: int | str, round_number: int, units: pd.DataFrame) -> bool:
    """Add the round's rows to the table (atomically, once: False when they are already there)."""
    folder = item_folder(paths, item)
    with io.file_lock(folder / ".units.lock"), signals.critical():
        table = read_units(folder)
        if table is not None and (table["round"] == round_number).any():
            return False
        write_units(folder, units if table is None else pd.concat([table, units], ignore_index=True))
        log = paths.root / CONFIRM_DIR / EVENTS_FILE
        with open(log, "a") as handle:
            handle.write(
                json.dumps({"round": round_number, "item": item, "by": f"{host_name()}:{os.getpid()}"}) + "\n"
            )
    return True


# ---- recomputing records from their tables -----------------------------------------------------------------
def rescore(
    paths: io.StudyPaths, item: int | str, info: dict[str, Any], baseline: pd.DataFrame | None
) -> None:
    """Metrics and intervals recomputed from the whole table; set metrics (FD, val_loss) kept as they were;
    objective, violations and feasibility judged as the recorder does; deltas paired over the same rounds."""
    folder = item_folder(paths, item)
    with io.file_lock(folder / ".units.lock"), signals.critical():
        table = read_units(folder)
        record = read_record(folder / io.TRIAL_METRICS)
        if table is None or record is None:
            return
        seed = int((info.get("eval") or {}).get("seed") or 0)
        values, intervals = summarize(table, lpips_key_of(table), seed=seed)
        record.metrics.update(values)
        record.intervals = {**(record.intervals or {}), **{k: i.to_json() for k, i in intervals.items()}}
        if item != BASELINE:
            judge(record, info, table, baseline, seed, read_baseline_metrics(paths.root))
        record.write(folder / io.TRIAL_METRICS)


def judge(
    record: TrialRecord,
    info: dict[str, Any],
    table: pd.DataFrame,
    baseline,
    seed: int,
    untuned_metrics: dict[str, Any] | None = None,
) -> None:
    metrics = record.metrics
    base: dict[str, float] = {}
    if baseline is not None and "round" in baseline:
        same = baseline[baseline["round"].isin(set(table["round"]))]  # the units this trial saw: paired
        base, _ = summarize(same, lpips_key_of(same), seed=seed)
        record.delta = {
            **(record.delta or {}),
            **{f"delta/{k}": metrics[k] - v for k, v in base.items() if k in metrics},
        }
    constraints = [parse_constraint(c) for c in info.get("constraints") or []]
    if constraints:
        untuned = base or untuned_metrics or {}  # relative constraints ("0.75x baseline") need the untuned
        record.violations = {str(c): c.violation(metrics, untuned) for c in constraints}
        record.feasible = all(v <= 0 for v in record.violations.values())
    objectives = info.get("objectives") or []
    if objectives and isinstance(metrics.get(objectives[0]["metric"]), (int, float)):
        record.objective = float(metrics[objectives[0]["metric"]])


# ---- the race ----------------------------------------------------------------------------------------------
class Race:
    def __init__(self, opts: Options, say=print):
        from sdsweep.sweep.run_setup import RunCaches

        self.opts, self.say = opts, say
        self.paths = io.StudyPaths(Path(opts.study_dir))
        self.data = load_study(self.paths.root)  # not a study folder: StudyFolderError, nothing created
        self.folder = self.paths.root / CONFIRM_DIR
        self.folder.mkdir(parents=True, exist_ok=True)
        self.info = self.data.info
        self.caches = RunCaches()
        self.claims = ClaimBook(self.folder, opts.grace, say)

    def images(self, trial: int | str) -> int:
        table = read_units(item_folder(self.paths, trial))
        return 0 if table is None else len(table)

    def budget(self, verdict) -> int:
        if self.opts.budget is not None:
            return self.opts.budget
        table = read_units(self.paths.trial(verdict.best)) if verdict.best is not None else None
        own = 0 if table is None else int((table["round"] == 0).sum())
        return 4 * own

    def has_weights(self, trial: int) -> bool:
        record = self.data.records.get(trial)
        return bool(record and record.weights and (self.paths.trial(trial) / record.weights).exists())

    def plan(self, round_number: int, verdict) -> dict[str, Any] | None:
        """The round's contenders, fixed once for every worker (the first writes it, the others read it)."""
        path = self.folder / f"r{round_number}" / "contenders.json"
        existing = io.read_json_or_none(path)
        if existing is not None:
            return existing
        # Only a contender with weights can be raced: one without (keep_best_k removed them during the sweep)
        # would never reach the budget, and racing would never end.
        racing = [t for t in verdict.contenders if self.has_weights(t)]
        for trial in sorted(set(verdict.contenders) - set(racing)):
            self.say(
                f"trial {trial} is a contender but has no weights (sweep.keep_best_k removed them): skipped"
            )
        reason = stop_reason(
            racing,
            {t: self.images(t) for t in racing},
            self.budget(verdict),
            round_number - 1,
            self.opts.max_rounds,
            uncertain=set(verdict.uncertain),
        )
        if reason is not None:
            self.finish(reason)
            return None
        baseline = (self.paths.baseline / io.TRIAL_CONFIG).is_file() and read_units(
            self.paths.baseline
        ) is not None
        items: list[int | str] = [*racing, *([BASELINE] if baseline else [])]
        payload = {
            "round": round_number,
            "contenders": racing,
            "why": {str(t): why_contender(verdict, t) for t in racing},
            "items": items,
        }
        path.parent.mkdir(parents=True, exist_ok=True)
        io.create_exclusive_json(path, payload)
        return io.read_json(path)

    def work(self, plan: dict[str, Any]) -> None:
        """Evaluate the round's items, claiming each; wait for the ones other workers hold."""
        r = plan["round"]
        while True:
            pending = [i for i in plan["items"] if not round_done(item_folder(self.paths, i), r)]
            if not pending:
                return
            progressed = False
            for item in pending:
                claim = self.folder / f"r{r}" / f"t{item}.claim"
                if not self.claims.try_claim(claim):
                    continue
                try:
                    if not round_done(item_folder(self.paths, item), r):
                        units = evaluate_item(self.paths, item, r, self.opts, self.caches)
                        append_round(self.paths, item, r, units)
                        progressed = True
                finally:
                    self.claims.release(claim)
            if not progressed:
                time.sleep(max(min(self.opts.grace / 4, 2.0), 0.2))

    def close_round(self, plan: dict[str, Any]):
        """Recompute records, results.csv, the verdict and the report after round r (once, under a lock)."""
        from sdsweep.results.report import build_report
        from sdsweep.results.table import write_results

        r = plan["round"]
        with io.file_lock(self.folder / ".state.lock"):
            state = self.state()
            if any(done["round"] == r for done in state["rounds"]):
                return
            baseline = read_units(self.paths.baseline) if BASELINE in plan["items"] else None
            if baseline is not None:
                rescore(self.paths, BASELINE, self.info, None)
            for trial in plan["contenders"]:
                rescore(self.paths, trial, self.info, baseline)
            with signals.critical():
                write_results(self.paths)
                self.data = load_study(self.paths.root)
                verdict = self.data.verdict(write=True)
            build_report(self.paths.root)
            units = {str(t): verdict.units.get(t) for t in plan["contenders"]}
            state["rounds"].append({**plan, "units": units, "sentence": verdict.sentence()})
            io.atomic_write_json(self.folder / STATE_FILE, state)
        each = ", ".join(f"trial {t}: {n}" for t, n in units.items())
        self.say(f"round {r}: contenders {plan['contenders']} (units {each}); {verdict.sentence()}")

    def state(self) -> dict[str, Any]:
        return io.read_json_or_none(self.folder / STATE_FILE) or {"rounds": [], "stopped": None}

    def finish(self, reason: str) -> None:
        with io.file_lock(self.folder / ".state.lock"):
            state = self.state()
            state["stopped"] = reason
            io.atomic_write_json(self.folder / STATE_FILE, state)

    def run(self) -> int:
        verdict = self.data.verdict(write=True)
        self.say(f"verdict: {verdict.sentence()}")
        lone_and_settled = len(verdict.contenders) <= 1 and not set(verdict.contenders) & set(
            verdict.uncertain
        )
        if lone_and_settled and not (self.folder / "r1" / "contenders.json").exists():
            self.finish("nothing to confirm: the best is separated and no contender is uncertain")
            self.say("nothing to confirm")
            return 0
        r = 1
        while True:
            plan = self.plan(r, verdict)
            if plan is None:
                break
            self.work(plan)
            self.close_round(plan)
            self.data = load_study(self.paths.root)
            verdict = self.data.verdict()
            r += 1
        state = self.state()
        self.say(f"confirmation stopped after {len(state['rounds'])} round(s): {state['stopped']}")
        self.say(f"final verdict: {verdict.sentence()}")
        return 0


def confirm(opts: Options, say=None) -> int:
    """Race the contenders; Ctrl-C/SIGTERM release this worker's claims and exit 130/143."""
    say = say or (lambda line: print(line, flush=True))
    previous = signals.install()
    race = None
    try:
        race = Race(opts, say)
        return race.run()
    except signals.HandBack as stop:
        signals.ignore_stops()
        if race is not None:
            race.claims.release_all()
        say(f"confirmation stopped by {stop}: this worker's claims released; re-run to resume")
        return stop.exit_code
    finally:
        if race is not None:
            race.claims.close()
        signals.restore(previous)
