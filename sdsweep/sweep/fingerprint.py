"""Study identity: what defines a study, recorded in study.json and checked on every re-run.

A study's trials are comparable only if they share their data, model, evaluation and the training
settings that are not swept. The fingerprint records exactly those; a re-run whose fingerprint differs
stops with the list of changes instead of passing the old results off as new ones.

- data: every image (path relative to the dataset folder) with the SHA-256 of its bytes and its caption.
  Hashes are cached by (path, size, mtime) under the cache folder, so a re-run reads no image twice.
- settings: the flattened config minus what cannot change a result (paths, tracking, device, the sweep
  block) and minus the swept keys. A swept group (``model``, ``method``, ``data``) drops its whole section.
- single runs (no ``+sweep``) differ from each other in training settings by design; their study is
  defined by what the shared baseline depends on: model, data and evaluation.
"""

from __future__ import annotations

import hashlib
import os
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from sdsweep import io
from sdsweep.config.resolve import flatten
from sdsweep.config.schema import Config
from sdsweep.errors import ConfigError

FINGERPRINT_VERSION = 1
RESET_MARKER_ENV = "SDSWEEP_STUDY_RESET_DONE"  # children of a reset run must not reset it again
# Keys that never change what a trial produces.
NOT_DEFINING = (
    "study",
    "study_reset",
    "device",
    "paths.",
    "tracking.",
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
SINGLE_RUN_SECTIONS = ("model.", "data.", "eval.")  # what the shared baseline depends on
GROUP_KEYS = ("model", "method", "data")  # swept config groups: the whole section varies


class StudyMismatchError(ConfigError):
    """The study folder holds results of another setup; the message lists the changes and the way out."""


# ---- hashing ----------------------------------------------------------------------------------------
def _hash_cache_file(cfg: Config) -> Path:
    from sdsweep.models.tiny import cache_root

    return cache_root(cfg.paths.cache) / "file-hashes.json"


def file_hashes(paths: list[Path], cache_file: Path) -> dict[Path, str]:
    """SHA-256 of each file's bytes, reusing cached hashes whose (size, mtime) still match."""
    try:
        cached = io.read_json(cache_file, {}) or {}
    except io.DamagedFileError:
        cached = {}  # a cache: rebuilt, never trusted when torn
    out, changed = {}, False
    for path in paths:
        key = str(path.resolve())
        stat = path.stat()
        entry = cached.get(key)
        if entry and entry.get("size") == stat.st_size and entry.get("mtime_ns") == stat.st_mtime_ns:
            out[path] = entry["sha256"]
            continue
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        out[path] = digest.hexdigest()
        cached[key] = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": out[path]}
        changed = True
    if changed:
        try:
            io.atomic_write_json(cache_file, cached)
        except OSError:
            pass  # a read-only cache only costs the re-hash next time
    return out


def _model_identity(cfg: Config) -> str:
    model = cfg.model
    local = Path(os.path.expanduser(model.path or model.pretrained))
    if model.path or local.is_dir():
        # A local folder may move between machines: identify it by its files and sizes, not its path.
        digest = hashlib.sha256()
        for file in sorted(p for p in local.rglob("*") if p.is_file() and not p.name.startswith(".")):
            digest.update(f"{file.relative_to(local)}:{file.stat().st_size}\n".encode())
        return f"local:{digest.hexdigest()[:16]}"
    return f"{model.pretrained}@{model.revision or 'main'}"


def _is_single(cfg: Config) -> bool:
    return cfg.sweep is None or cfg.sweep.name == "single"


def _defining(key: str, swept: set[str], single: bool) -> bool:
    if single and not key.startswith(SINGLE_RUN_SECTIONS):
        return False
    if any(key == k or key.startswith(f"{k}.") for k in NOT_DEFINING):
        return False
    if key in swept:
        return False
    return not any(key.startswith(f"{group}.") for group in GROUP_KEYS if group in swept)


def study_fingerprint(cfg: Config, examples: list[Any] | None = None) -> dict[str, Any]:
    """The study's identity as plain JSON: {"version", "model", "data": {file: {sha256, caption}}, "settings"}."""
    from sdsweep.data.examples import load_examples

    single = _is_single(cfg)
    swept = set(cfg.sweep.params) if cfg.sweep is not None else set()
    settings = {k: v for k, v in flatten(cfg).items() if _defining(k, swept, single)}
    data: dict[str, Any] | None = None
    if "data" not in swept:
        examples = examples if examples is not None else load_examples(cfg)
        files = [Path(e.image_path) for e in examples]
        root = Path(os.path.commonpath([str(f.resolve().parent) for f in files])) if files else Path(".")
        hashes = file_hashes(files, _hash_cache_file(cfg))
        data = {
            str(f.resolve().relative_to(root)): {"sha256": hashes[f], "caption": e.caption}
            for f, e in zip(files, examples, strict=True)
        }
    model = _model_identity(cfg) if "model" not in swept else None
    return {"version": FINGERPRINT_VERSION, "model": model, "data": data, "settings": settings}


# ---- comparing --------------------------------------------------------------------------------------
def _names(items: list[str], limit: int = 5) -> str:
    return ", ".join(items[:limit]) + (f" and {len(items) - limit} more" if len(items) > limit else "")


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
        added, removed = sorted(new_data.keys() - old_data.keys()), sorted(old_data.keys() - new_data.keys())
        parts = [
            f"{len(items)} file(s) {what}: {_names(items)}"
            for what, items in (
                ("changed", changed),
                ("added", added),
                ("removed", removed),
                ("with a new caption", recaptioned),
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
    from sdsweep.study.store import single_run_sweep

    sweep = cfg.sweep or single_run_sweep()
    storage = sweep.storage or f"sqlite:///{paths.storage_db.resolve()}"
    return {
        "study": cfg.study,
        "storage": storage,
        "sweep": sweep.name,
        "sampler": sweep.sampler,
        "params": sorted(sweep.params),
        "objectives": [{"metric": o.metric, "direction": o.direction} for o in sweep.objectives],
        "constraints": list(sweep.constraints),
        "model": cfg.model.name,
        "pretrained": cfg.model.path or cfg.model.pretrained,
        "method": cfg.method.name,
        "trigger_word": cfg.data.trigger_word,
        "placeholder_token": cfg.method.placeholder_token if cfg.method.name == "textual_inversion" else None,
        "eval": {
            "prompts": list(cfg.eval.prompts),
            "seeds": [cfg.eval.seed + i for i in range(cfg.eval.num_images_per_prompt)],
            "scheduler": cfg.eval.scheduler,
            "num_inference_steps": cfg.eval.num_inference_steps,
            # Only when set: the study.json of a study without prior prompts stays as it was.
            **({"prior_prompts": list(cfg.eval.prior_prompts)} if cfg.eval.prior_prompts else {}),
        },
        "overrides": list(overrides),
    }


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
    and ``io.DamagedFileError`` when study.json is torn. Never rewrites the fingerprint of a study.
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


def check_study_unchanged(cfg: Config, paths: io.StudyPaths) -> None:
    """Between runs of a sweep: raise ``StudyMismatchError`` when the data (or the model files, or the
    settings in conf/) changed since the study was defined. Cheap: file hashes are cached by size and
    mtime, so only changed files are read. Runs trained after such a change would not be comparable
    with the ones before, so the sweep stops instead of mixing them."""
    stored = io.read_json_or_none(paths.study_json)  # torn: the start-up check names it
    previous = (stored or {}).get("fingerprint")
    if not previous:
        return
    changes = describe_changes(previous, study_fingerprint(cfg))
    if changes:
        raise StudyMismatchError(
            f"the study {cfg.study} changed while its sweep was running: {'; '.join(changes)}. Runs trained "
            "from now on would not be comparable with the finished ones, so this sweep stops (finished trials "
            "are kept). Put the data and settings back and re-run the same command to continue, or start a new "
            "study (study=<new name>, or study_reset=true to move this one aside)."
        )
