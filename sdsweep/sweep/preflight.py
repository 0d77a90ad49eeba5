"""Checks that would otherwise fail after minutes of work, run before any model loads.

The study folder is intact, the model and every model/method/data the sweep can switch to are
available, the CLIP model and safety checker are reachable, the reference images exist, every data
file decodes, and the study folder belongs to this setup (sdsweep.sweep.fingerprint).
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sdsweep import io
from sdsweep.config.schema import Config
from sdsweep.sweep.search_space import available_search_space

SQLITE_HEADER = b"SQLite format 3\x00"


class PreflightError(Exception):
    """Something the user must fix before the sweep can start; the message names it and the fix."""


# ---- the study folder -------------------------------------------------------------------------------
def _way_out(path: Path, study: str) -> str:
    return (
        f"Move it aside to start that part over (mv '{path}' '{path}.bad'), or start the whole study over with "
        f"study_reset=true (the old folder is kept as {study}.old-<UTC time>), or use a new study=<name>."
    )


def check_sqlite(path: Path, study: str) -> None:
    """An Optuna SQLite file that is empty, not SQLite, or torn is refused by name (never overwritten)."""
    if not path.exists():
        return
    size = path.stat().st_size
    if size == 0:
        raise PreflightError(
            f"{path} is empty (0 bytes): the study's trial history is lost. " + _way_out(path, study)
        )
    with open(path, "rb") as f:
        header = f.read(len(SQLITE_HEADER))
    if header != SQLITE_HEADER:
        raise PreflightError(
            f"{path} is not an SQLite database (damaged or overwritten). " + _way_out(path, study)
        )
    try:
        # Read-write on purpose: a process killed inside a transaction leaves a hot journal, which the next
        # connection must roll back (SQLite's own crash recovery, as Optuna's connection would do). A
        # read-only connection cannot, and answers "attempt to write a readonly database": the study is fine.
        connection = sqlite3.connect(str(path.resolve()), timeout=60)
        try:
            verdict = connection.execute("PRAGMA quick_check").fetchone()[0]
            connection.execute("SELECT count(*) FROM sqlite_master").fetchone()
        finally:
            connection.close()
    except sqlite3.OperationalError as error:
        if "locked" in str(error) or "busy" in str(error):
            return  # another process of the study is writing: busy, not damaged
        verdict = str(error)
    except sqlite3.DatabaseError as error:
        verdict = str(error)
    if verdict != "ok":
        raise PreflightError(f"{path} is damaged ({verdict}). " + _way_out(path, study))


def check_study_folder(cfg: Config, paths: io.StudyPaths) -> None:
    """study.db, study.json and the baseline's metrics.json are readable, if they exist."""
    default_storage = cfg.sweep is None or not cfg.sweep.storage
    if default_storage:
        check_sqlite(paths.storage_db, cfg.study)
        if not paths.storage_db.exists() and paths.trial_dirs():
            raise PreflightError(
                f"{paths.root} holds trials/ but its study.db is missing, so a new study would overwrite them. "
                + _way_out(paths.storage_db, cfg.study)
            )
    for path in (paths.study_json, paths.baseline / io.TRIAL_METRICS):
        try:
            io.read_json(path)
        except io.DamagedFileError as error:
            raise PreflightError(f"{error} " + _way_out(path, cfg.study)) from None


# ---- models used by evaluation ----------------------------------------------------------------------
def _hub_or_local_reason(name: str, what: str, setting: str, required: str = "config.json") -> str | None:
    from sdsweep.models.loading import hub_offline

    local = Path(os.path.expanduser(name))
    if local.is_dir():
        return None if (local / required).exists() else f"{what} folder {name!r} has no {required}"
    if local.is_absolute() or name.startswith((".", "~")):
        return f"{what} folder {name!r} does not exist"
    from huggingface_hub import model_info, try_to_load_from_cache

    cached = try_to_load_from_cache(name, required)
    if isinstance(cached, str):
        return None
    if hub_offline():
        return (
            f"{what} {name!r} is not in the local Hugging Face cache and HF_HUB_OFFLINE is set: download it "
            f"once (`huggingface-cli download {name}`) or set {setting} to a local folder"
        )
    try:
        model_info(name, timeout=10)
        return None
    except Exception as error:
        return (
            f"{what} {name!r} cannot be reached ({type(error).__name__}); download it once or set {setting}"
        )


def eval_model_problems(cfg: Config) -> list[str]:
    """The CLIP model (CLIP score, CLIP-I, CLIP-feature FID/KID) and the safety checker, if enabled."""
    ev = cfg.eval
    wanted = set(ev.metrics)
    needs_clip = bool({"clip_score", "clip_i", "cmmd"} & wanted) or (
        bool({"fid", "kid"} & wanted) and ev.fid_features in ("clip", "auto")
    )
    problems = []
    if needs_clip and ev.clip_model != "tiny":
        from sdsweep.models import shapes  # shapes:sd15[@seed<N>] -> that build's clip/ folder

        clip = shapes.resolve_clip(ev.clip_model, cfg.paths.cache) or ev.clip_model
        reason = _hub_or_local_reason(clip, "the CLIP model", "eval.clip_model ('tiny' offline)")
        if reason:
            problems.append(reason)
    if "dino" in wanted and ev.dino_model != "tiny":
        reason = _hub_or_local_reason(ev.dino_model, "the DINO model", "eval.dino_model ('tiny' offline)")
        if reason:
            problems.append(reason)
    if ev.safety_checker:
        reason = _hub_or_local_reason(
            ev.safety_checker, "the safety checker", "eval.safety_checker (or null)"
        )
        if reason:
            problems.append(reason)
    return problems


def reference_dir_problem(cfg: Config) -> str | None:
    from sdsweep.data.examples import IMAGE_SUFFIXES

    if not cfg.eval.reference_dir:
        return None
    folder = Path(cfg.eval.reference_dir).expanduser()
    if not folder.is_dir():
        return (
            f"eval.reference_dir={cfg.eval.reference_dir!r} does not exist (or set eval.reference_dir=null)"
        )
    if not any(p.suffix.lower() in IMAGE_SUFFIXES for p in folder.iterdir()):
        return f"eval.reference_dir={cfg.eval.reference_dir!r} holds no images ({', '.join(IMAGE_SUFFIXES)})"
    return None


# ---- the search space (#18): sdsweep/sweep/search_space.py decides what is available --------------


def search_space_problem(cfg: Config) -> str | None:
    """One message for every unavailable choice; with sweep.skip_unavailable the sweep drops them instead."""
    params, missing = available_search_space(cfg)
    if not missing:
        return None
    listed = "; ".join(f"{m.key}={m.value}: {m.reason}" for m in missing)
    empty = [k for k, spec in params.items() if spec.choices is not None and not spec.choices]
    if cfg.sweep is not None and cfg.sweep.skip_unavailable and not empty:
        print(f"[sdsweep] sweep.skip_unavailable: leaving out {listed}", flush=True)
        return None
    fix = (
        "nothing is left to sweep over for " + ", ".join(empty)
        if empty and cfg.sweep is not None and cfg.sweep.skip_unavailable
        else "or add sweep.skip_unavailable=true to sweep over the available values only"
    )
    return f"the sweep can choose values that are not available: {listed}. Make them available, {fix}."


# ---- the whole preflight ----------------------------------------------------------------------------
def _token_counter(model_folder: str):
    """The model's own tokenizer (a small file, not the model) to find captions that get cut short."""
    try:
        from transformers import CLIPTokenizer

        tokenizer = CLIPTokenizer.from_pretrained(model_folder, subfolder="tokenizer")
    except Exception:
        return None
    return lambda text: len(tokenizer(text, truncation=False)["input_ids"])


def run_preflight(overrides: list[str], requested: Config | None = None):
    """Every check, in order of cost; raises ``PreflightError`` or ``ConfigError`` (the user's to fix).

    ``requested``: the config the overrides ask for (``run_config.requested_config``), when the caller has
    built it already. Returns the dataset's ``DataSummary`` (already printed).
    """
    from sdsweep.config.methods import check_method_overrides
    from sdsweep.sweep.run_config import requested_config  # what the sweep builds, before skip_unavailable
    from sdsweep.training.memory import check_fits

    cfg = requested_config(overrides) if requested is None else requested
    swept = cfg.sweep.params.get("method") if cfg.sweep else None
    check_method_overrides(
        cfg.method.name, overrides, [str(m) for m in getattr(swept, "choices", None) or []]
    )
    paths = io.StudyPaths.of(cfg.paths.root, cfg.study)
    problems, device, summary = _collect_problems(cfg, paths)
    _raise_problems(problems)
    from sdsweep.training.distributed import check_devices

    check_devices(cfg, device)  # one GPU per rank of every worker
    memory = check_fits(cfg, device)  # a ConfigError listing settings that fit, on a too-small GPU
    _check_study_identity(cfg, paths, overrides)
    _print_findings(cfg, summary, device, memory)
    return summary


def _expected_errors() -> tuple[type[Exception], ...]:
    """What a check raises for something the user must fix; any other exception is a bug and propagates."""
    from sdsweep.data.examples import DataError
    from sdsweep.models.loading import ModelUnavailableError

    return (ModelUnavailableError, DataError, io.DamagedFileError, PreflightError)


def _attempt(step: Callable[[], Any], problems: list[str]) -> Any:
    """``step()``; when it fails for a reason the user can fix, its message goes to ``problems`` and None back."""
    try:
        return step()
    except _expected_errors() as error:
        problems.append(str(error))
        return None


def _collect_problems(cfg: Config, paths: io.StudyPaths) -> tuple[list[str], Any, Any]:
    """Every cheap check, each run even when an earlier one failed, so one message lists all (#32).

    Returns the problems, the selected device and the dataset's summary (None when it failed).
    """
    from sdsweep.data.examples import summarize_dataset
    from sdsweep.models.loading import resolve_model_source, select_device, unavailable_features
    from sdsweep.sweep.fingerprint import reset_study_if_asked

    problems: list[str] = []
    _attempt(lambda: reset_study_if_asked(cfg, paths), problems)
    _attempt(lambda: check_study_folder(cfg, paths), problems)
    source = _attempt(lambda: resolve_model_source(cfg.model, cfg.paths.cache), problems)
    from sdsweep.models.parts import vae_path_problem

    vae_problem = vae_path_problem(cfg.model)
    if vae_problem:
        problems.append(vae_problem)
    evaluation = eval_model_problems(cfg)
    reference = reference_dir_problem(cfg)
    if reference:
        evaluation.append(reference)
    if evaluation:
        problems.append("evaluation needs what is missing: " + "; ".join(evaluation) + ".")
    device = select_device(cfg.device)
    unavailable = unavailable_features(cfg, device)
    if unavailable:
        problems.append("requested but unavailable here: " + "; ".join(unavailable) + ".")
    summary = _attempt(lambda: summarize_dataset(cfg, _token_counter(source) if source else None), problems)
    space = _attempt(lambda: search_space_problem(cfg), problems)
    if space:
        problems.append(space)
    return problems, device, summary


def _raise_problems(problems: list[str]) -> None:
    """One ``PreflightError`` naming the problem, or numbering them when there are several."""
    if len(problems) == 1:
        raise PreflightError(problems[0])
    if problems:
        listed = "".join(f"\n  {n}. {problem}" for n, problem in enumerate(problems, 1))
        raise PreflightError(f"{len(problems)} things to fix before the run can start:{listed}")


def _check_study_identity(cfg: Config, paths: io.StudyPaths, overrides: list[str]) -> None:
    """The study folder belongs to this setup (sdsweep.sweep.fingerprint); the data was verified above."""
    from sdsweep.config.compose import user_overrides
    from sdsweep.data.examples import list_examples
    from sdsweep.sweep.fingerprint import ensure_study_identity

    try:
        ensure_study_identity(cfg, paths, user_overrides(overrides), list_examples(cfg))
    except _expected_errors() as error:
        raise PreflightError(str(error)) from None


def _print_findings(cfg: Config, summary: Any, device: Any, memory: Any) -> None:
    """The dataset summary, the predicted training memory and, for several ranks, the global batch."""
    print(f"[sdsweep] {summary.describe()}", flush=True)
    print(f"[sdsweep] training memory on {device}: {memory.describe()}", flush=True)
    if cfg.train.num_processes > 1:
        t = cfg.train
        print(
            f"[sdsweep] {t.num_processes} ranks per run: global batch {t.train_batch_size} x {t.num_processes} x "
            f"{t.gradient_accumulation_steps} = {t.train_batch_size * t.num_processes * t.gradient_accumulation_steps}"
            " (train_batch_size x num_processes x gradient_accumulation_steps); memory above is per device",
            flush=True,
        )
