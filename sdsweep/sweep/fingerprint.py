"""Study identity: what defines a study, recorded in study.json and checked on every re-run.

A study's trials are comparable only if they share their data, model, evaluation and the training
settings that are not swept. The fingerprint records exactly those, by content, never by location: the
same study seen through another path (an absolute or relative spelling, a symlink, a moved folder, a
node that mounts the shared disk elsewhere) is the same study. A re-run whose fingerprint differs stops
with the list of changes instead of passing the old results off as new ones.

- data: every image (path relative to the dataset folder) with the SHA-256 of its bytes and its caption.
- model: a hub name at its revision, or for a local folder (``model.path``) the content hash of its
  files (sdsweep/content.py: each file is read once per path, size and mtime).
- settings: the flattened config minus what cannot change a result (where things are: ``paths``,
  ``tracking``, the storage, the device; the sweep block) and minus the swept keys. A swept group
  (``model``, ``method``, ``data``) drops its whole section. A local evaluation folder
  (``eval.reference_dir``, a local ``eval.clip_model``) is recorded by content too.
- single runs (no ``+sweep``) differ from each other in training settings by design; their study is
  defined by what the shared baseline depends on: model, data and evaluation.

Older study.json files recorded some locations (``paths.root``, ``tracking.*``, a local model by file
names and sizes); they are read with those keys ignored, and rewritten once without them.
"""

from __future__ import annotations

import hashlib
import os
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from sdsweep import io
from sdsweep.config.methods import method_spec
from sdsweep.config.resolve import flatten
from sdsweep.config.schema import Config
from sdsweep.content import CONTENT_PREFIX, file_hashes, folder_identity
from sdsweep.errors import ConfigError

FINGERPRINT_VERSION = 2  # 2: location-free (no paths.*, tracking.*; a local model by content)
RESET_MARKER_ENV = "SDSWEEP_STUDY_RESET_DONE"  # children of a reset run must not reset it again
# Keys that never change what a trial produces (each also covers its sub-keys: "paths" -> "paths.root").
NOT_DEFINING = (
    "study",
    "study_reset",
    "device",
    "paths",
    "tracking",
    "sweep",
    "model.path",
    "model.pretrained",
    "data.path",
    "data.image_column",
    "data.caption_column",
    "train.log_every",
    "train.checkpoint_at_milestones",
    "train.use_latent_cache",
    "train.compile",
    "eval.batch_size",
    "eval.baseline",
)
# Keys that only say where something is (the data and model folders are checked by content).
LOCATION_ONLY = ("paths", "tracking.dir", "sweep.storage", "model.path", "data.path", "eval.reference_dir")
STUDY_LOCATION = ("paths.root", "paths.cache", "tracking.dir")  # where the study and its caches are
# Settings that name a local folder: recorded by its content (a hub name stays as it is).
CONTENT_SETTINGS = ("eval.reference_dir", "eval.clip_model")
SINGLE_RUN_SECTIONS = ("model.", "data.", "eval.")  # what the shared baseline depends on
GROUP_KEYS = ("model", "method", "data")  # swept config groups: the whole section varies
LEGACY_LOCAL_MODEL = "local:"  # version 1 named a local model by its file names and sizes


class StudyMismatchError(ConfigError):
    """The study folder holds results of another setup; the message lists the changes and the way out."""


# ---- hashing ----------------------------------------------------------------------------------------
def hash_cache_file(cfg: Config) -> Path:
    """Where file hashes are cached: the machine's one hash cache (``file_hash_cache``)."""
    from sdsweep.models.tiny import file_hash_cache

    return file_hash_cache(cfg.paths.cache)


def _local_model_folder(cfg: Config) -> Path | None:
    model = cfg.model
    local = Path(os.path.expanduser(model.path or model.pretrained))
    return local if model.path or local.is_dir() else None


def _model_identity(cfg: Config) -> str:
    local = _local_model_folder(cfg)
    if local is not None:
        # A local folder may move between machines or mount points: identify it by what its files hold.
        return folder_identity(local, hash_cache_file(cfg))
    return f"{cfg.model.pretrained}@{cfg.model.revision or 'main'}"


def _legacy_model_identity(cfg: Config) -> str | None:
    """Version 1's name for a local model (file names and sizes), to read older study.json files."""
    local = _local_model_folder(cfg)
    if local is None:
        return None
    digest = hashlib.sha256()
    for file in sorted(p for p in local.rglob("*") if p.is_file() and not p.name.startswith(".")):
        digest.update(f"{file.relative_to(local)}:{file.stat().st_size}\n".encode())
    return f"{LEGACY_LOCAL_MODEL}{digest.hexdigest()[:16]}"


def _content_setting(cfg: Config, value: Any) -> Any:
    """A local folder by content; anything else (a hub name, None) as it is."""
    if not isinstance(value, str) or not value:
        return value
    local = Path(os.path.expanduser(value))
    return folder_identity(local, hash_cache_file(cfg)) if local.is_dir() else value


def _is_single(cfg: Config) -> bool:
    return cfg.sweep is None or cfg.sweep.single_run


def is_location(key: str) -> bool:
    """A key that says where something is, or otherwise never changes a result."""
    return any(key == k or key.startswith(f"{k}.") for k in NOT_DEFINING)


def is_location_only(key: str) -> bool:
    return any(key == k or key.startswith(f"{k}.") for k in LOCATION_ONLY)


def _defining(key: str, swept: set[str], single: bool) -> bool:
    if single and not key.startswith(SINGLE_RUN_SECTIONS):
        return False
    if is_location(key):
        return False
    if key in swept:
        return False
    return not any(key.startswith(f"{group}.") for group in GROUP_KEYS if group in swept)


def _data_entry(sha256: str, example: Any) -> dict[str, Any]:
    """One image's identity; kohya repeats and a held-out split only when set, so fingerprints of studies
    without them stay as they were."""
    entry: dict[str, Any] = {"sha256": sha256, "caption": example.caption}
    if getattr(example, "repeats", 1) != 1:
        entry["repeats"] = example.repeats
    if getattr(example, "heldout", False):
        entry["heldout"] = True
    return entry


def study_fingerprint(cfg: Config, examples: list[Any] | None = None) -> dict[str, Any]:
    """The study's identity as plain JSON: {"version", "model", "data": {file: {sha256, caption}}, "settings"}."""
    from sdsweep.data.examples import load_examples

    single = _is_single(cfg)
    swept = set(cfg.sweep.params) if cfg.sweep is not None else set()
    settings = {k: v for k, v in flatten(cfg).items() if _defining(k, swept, single)}
    for key in CONTENT_SETTINGS:
        if key in settings:
            settings[key] = _content_setting(cfg, settings[key])
    data: dict[str, Any] | None = None
    if "data" not in swept:
        examples = examples if examples is not None else load_examples(cfg)
        files = [Path(e.image_path) for e in examples]
        root = Path(os.path.commonpath([str(f.resolve().parent) for f in files])) if files else Path(".")
        hashes = file_hashes(files, hash_cache_file(cfg))
        data = {
            str(f.resolve().relative_to(root)): _data_entry(hashes[f], e)
            for f, e in zip(files, examples, strict=True)
        }
    model = _model_identity(cfg) if "model" not in swept else None
    return {"version": FINGERPRINT_VERSION, "model": model, "data": data, "settings": settings}


def located(stored: dict[str, Any], cfg: Config) -> tuple[dict[str, Any], list[str]]:
    """``stored`` without what an older version recorded about locations, and the names of what was dropped.

    Location keys of ``settings`` go; a local folder named by path where this version names it by content
    goes too; a version-1 local model (file names and sizes) becomes this version's content identity when
    it still matches the folder the run uses (so a changed model still shows as a change)."""
    settings = dict(stored.get("settings") or {})
    dropped = [k for k in settings if is_location(k)]
    current = flatten(cfg)
    for key in CONTENT_SETTINGS:
        value = settings.get(key)
        if isinstance(value, str) and not value.startswith(CONTENT_PREFIX):
            if str(_content_setting(cfg, current.get(key))).startswith(CONTENT_PREFIX):
                dropped.append(key)  # version 1 recorded the folder's path: only its content counts now
    for key in dropped:
        settings.pop(key, None)
    out = {**stored, "settings": settings}
    model = stored.get("model")
    if (
        isinstance(model, str)
        and model.startswith(LEGACY_LOCAL_MODEL)
        and model == _legacy_model_identity(cfg)
    ):
        out["model"] = _model_identity(cfg)
        dropped.append("model (file names and sizes)")
    if dropped:
        out["version"] = FINGERPRINT_VERSION
    return out, dropped


# ---- comparing --------------------------------------------------------------------------------------
def _names(items: list[str], limit: int = 5) -> str:
    return ", ".join(items[:limit]) + (f" and {len(items) - limit} more" if len(items) > limit else "")


def _grouped(keys: list[str]) -> list[str]:
    """``paths.root, paths.cache, eval.reference_dir`` -> ``paths.*, eval.reference_dir``."""
    sections = {k.split(".", 1)[0] for k in keys if k.split(".", 1)[0] in ("paths", "tracking", "sweep")}
    return sorted({f"{k.split('.', 1)[0]}.*" if k.split(".", 1)[0] in sections else k for k in keys})


def describe_changes(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Human lines for what differs, e.g. "data: 3 files changed, 1 added: a.jpg" or "method.rank: 4 -> 8".

    Settings present on only one side are not changes: a key swept before and fixed now (or the
    reverse) was varied by the study's trials anyway.
    """
    lines = []
    if old.get("model") and new.get("model") and old["model"] != new["model"]:
        lines.append(f"model: {old['model']} -> {new['model']}")
    old_data, new_data = old.get("data"), new.get("data")
    if old_data is not None and new_data is not None and old_data != new_data:
        changed = sorted(
            k for k in old_data.keys() & new_data.keys() if old_data[k]["sha256"] != new_data[k]["sha256"]
        )
        recaptioned = sorted(
            k for k in old_data.keys() & new_data.keys() if old_data[k]["caption"] != new_data[k]["caption"]
        )
        both = old_data.keys() & new_data.keys()
        repeated = sorted(k for k in both if old_data[k].get("repeats", 1) != new_data[k].get("repeats", 1))
        resplit = sorted(
            k for k in both if old_data[k].get("heldout", False) != new_data[k].get("heldout", False)
        )
        added, removed = sorted(new_data.keys() - old_data.keys()), sorted(old_data.keys() - new_data.keys())
        parts = [
            f"{len(items)} file(s) {what}: {_names(items)}"
            for what, items in (
                ("changed", changed),
                ("added", added),
                ("removed", removed),
                ("with a new caption", recaptioned),
                ("with new repeats", repeated),
                ("moved between the train and held-out splits", resplit),
            )
            if items
        ]
        lines.append("data: " + "; ".join(parts))
    old_settings, new_settings = old.get("settings") or {}, new.get("settings") or {}
    for key in sorted(old_settings.keys() & new_settings.keys()):
        if old_settings[key] != new_settings[key]:
            lines.append(f"{key}: {old_settings[key]!r} -> {new_settings[key]!r}")
    return lines


# ---- study.json -------------------------------------------------------------------------------------
def study_description(cfg: Config, paths: io.StudyPaths, overrides: list[str]) -> dict[str, Any]:
    """The descriptive study.json fields the report and export read (as SweepDriver wrote them)."""
    from sdsweep.config.schema import single_run_sweep

    sweep = cfg.sweep or single_run_sweep()
    spec = method_spec(cfg.method.name)
    return {
        "study": cfg.study,
        # null: the study's own study.db, wherever the folder is now. A shared storage is named without
        # its password (a results file is no place for credentials).
        "storage": strip_password(sweep.storage) if sweep.storage else None,
        "sweep": sweep.name,
        "sampler": sweep.sampler,
        "params": sorted(sweep.params),
        "objectives": [{"metric": o.metric, "direction": o.direction} for o in sweep.objectives],
        "constraints": list(sweep.constraints),
        "model": cfg.model.name,
        "pretrained": cfg.model.path or cfg.model.pretrained,
        "method": cfg.method.name,
        "trigger_word": cfg.data.trigger_word,
        "placeholder_token": spec.concept_token(cfg.method) if spec else None,
        "eval": {
            "prompts": list(cfg.eval.prompts),
            "seeds": [cfg.eval.seed + i for i in range(cfg.eval.num_images_per_prompt)],
            "scheduler": cfg.eval.scheduler,
            "num_inference_steps": cfg.eval.num_inference_steps,
            # Only when set: the study.json of a study without prior prompts stays as it was.
            **({"prior_prompts": list(cfg.eval.prior_prompts)} if cfg.eval.prior_prompts else {}),
        },
        # The command line as given, less where the study lives (the folder may move; it is where it is)
        # and less any password in a storage URL.
        "overrides": [
            strip_password(o) for o in overrides if o.lstrip("+~").split("=", 1)[0] not in STUDY_LOCATION
        ],
    }


def strip_password(url: str) -> str:
    """``postgresql://user:secret@host/db`` -> ``postgresql://user:***@host/db``."""
    from sdsweep.sweep.tracking_values import strip_secrets

    return strip_secrets({"url": url})["url"]


def reset_study_if_asked(cfg: Config, paths: io.StudyPaths) -> Path | None:
    """``study_reset=true``: move the study folder aside to ``<study>.old-<UTC time>`` (files kept).

    Done once per command: the driver and its trial processes inherit a marker, so the folder the
    first call starts afresh is never moved again by the same run.
    """
    root = paths.root.resolve()
    if not cfg.study_reset or os.environ.get(RESET_MARKER_ENV) == str(root):
        return None
    os.environ[RESET_MARKER_ENV] = str(root)
    if not root.exists() or not any(root.iterdir()):
        return None
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    aside = root.with_name(f"{root.name}.old-{stamp}")
    while aside.exists():  # two resets within a second
        time.sleep(1)
        aside = root.with_name(f"{root.name}.old-{datetime.now(timezone.utc).strftime('%Y%m%dT%H%M%SZ')}")
    os.replace(root, aside)
    print(f"[sdsweep] study_reset: the old study folder was moved to {aside}; starting afresh", flush=True)
    return aside


def ensure_study_identity(
    cfg: Config, paths: io.StudyPaths, overrides: list[str], examples: list[Any] | None = None
) -> None:
    """Write study.json with the fingerprint, or check the existing one matches this run.

    Raises ``StudyMismatchError`` naming what changed when the folder holds another setup's study,
    and ``io.DamagedFileError`` when study.json is torn. Never changes the identity of a study: an
    older fingerprint is rewritten only to drop the locations it recorded (see ``located``).
    """
    reset_study_if_asked(cfg, paths)
    current = study_fingerprint(cfg, examples)
    stored = io.read_json(paths.study_json)
    description = study_description(cfg, paths, overrides)
    if stored is None:
        created = datetime.now(timezone.utc).isoformat(timespec="seconds")
        # Created once: of several drivers starting a new study together, one defines it and the others
        # are checked against it (two at once with different data must not both start it).
        if io.create_exclusive_json(
            paths.study_json, {**description, "fingerprint": current, "created": created}
        ):
            return
        stored = io.read_json(paths.study_json)
    previous = stored.get("fingerprint")
    if previous is None:  # a study from before fingerprints: adopt it, its trials are assumed to match
        print(f"[sdsweep] note: {paths.study_json} has no fingerprint yet; recording this run's", flush=True)
        previous = current
    previous, dropped = located(previous, cfg)
    if dropped:
        print(
            f"[sdsweep] note: {paths.study_json} was written by an older sdsweep that recorded where things "
            f"were ({', '.join(_grouped(dropped))}); location never changes a study's identity, so they are ignored",
            flush=True,
        )
    changes = describe_changes(previous, current)
    if changes:
        raise StudyMismatchError(
            f"the study folder {paths.root} holds results of a different setup, so they cannot be resumed or "
            f"compared with this run. Changed since it was created: {'; '.join(changes)}. Either give this "
            f"run its own study (study=<new name>), or start over with study_reset=true (the old folder is "
            f"kept as {paths.root.name}.old-<UTC time>)."
        )
    # Same study: refresh what the sweep looks like now (params, objectives) but keep its identity.
    updated = {**stored, **description, "fingerprint": previous}
    updated.setdefault("created", stored.get("created"))
    if updated != stored:
        io.atomic_write_json(paths.study_json, updated)


def check_study_unchanged(
    cfg: Config, paths: io.StudyPaths, examples: list[Any] | None = None, data_only: bool = False
) -> None:
    """Between runs of a sweep: raise ``StudyMismatchError`` when the data (or the model files, or the
    settings in conf/) changed since the study was defined. Cheap: file hashes are cached by size and
    mtime, so only changed files are read. Runs trained after such a change would not be comparable
    with the ones before, so the sweep stops instead of mixing them."""
    stored = io.read_json_or_none(paths.study_json)  # torn: the start-up check names it
    previous = (stored or {}).get("fingerprint")
    if not previous:
        return
    old, new = located(previous, cfg)[0], study_fingerprint(cfg, examples)
    if data_only:  # a run's own config differs from the study's by design (its point, a method's prompts)
        old, new = {**old, "settings": {}}, {**new, "settings": {}}
    changes = describe_changes(old, new)
    if changes:
        raise StudyMismatchError(
            f"the study {cfg.study} changed while its sweep was running: {'; '.join(changes)}. Runs trained "
            "from now on would not be comparable with the finished ones, so this sweep stops (finished trials "
            "are kept). Put the data and settings back and re-run the same command to continue, or start a new "
            "study (study=<new name>, or study_reset=true to move this one aside)."
        )


def raise_if_data_changed(cfg: Config, paths: io.StudyPaths, error: BaseException) -> None:
    """A run failed while loading: when the study changed meanwhile (or its data cannot be read now, while it
    could when the sweep started: a file half rewritten), raise ``StudyMismatchError`` instead, so the run
    is handed back rather than failed. Otherwise return, and the caller records the original error."""
    try:
        check_study_unchanged(cfg, paths, data_only=True)
    except StudyMismatchError:
        raise
    except Exception as unreadable:
        raise StudyMismatchError(
            f"the study {cfg.study} changed while its sweep was running: its data cannot be read now "
            f"({type(unreadable).__name__}: {unreadable}). Put the data back and re-run the same command to continue."
        ) from error
