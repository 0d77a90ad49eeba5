"""Atomic file writes and the study folder layout.

Every result file is written to a temporary name beside its target and renamed into place, so a
killed sweep leaves either the old file or the new one, never half of one.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any


def _read_umask() -> int:
    # os.umask can only be read by setting it; done once at import, before any worker threads start.
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


UMASK = _read_umask()
FILE_MODE = 0o666 & ~UMASK  # what open() would give: 0644 under the usual umask 022
DIR_MODE = 0o777 & ~UMASK  # what mkdir() would give: 0755 under umask 022


class DamagedFileError(ValueError):
    """A result file exists but cannot be read (torn write, edited by hand). The message names it."""


def _tmp_beside(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    # mkstemp creates 0600 files; give the result the permissions a plain write would have, so other
    # users of a shared machine can read reports and results.
    os.chmod(name, FILE_MODE)
    return Path(name)


def _written_beside(path: Path, data: bytes) -> Path:
    """``data`` in a synced temporary file beside ``path`` (same filesystem, so it can be renamed in)."""
    tmp = _tmp_beside(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:  # a full disk, a signal: no stray temporary file is left behind
        tmp.unlink(missing_ok=True)
        raise
    return tmp


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    path = Path(path)
    tmp = _written_beside(path, data)
    try:
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


@contextlib.contextmanager
def file_lock(path: str | os.PathLike) -> Iterator[None]:
    """An exclusive lock shared by every process of a study folder (flock: released when its holder dies,
    so a killed process never leaves it held)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def create_exclusive_bytes(path: str | os.PathLike, data: bytes) -> bool:
    """Write ``path`` whole, only if it does not exist yet; False when another process created it first.

    The file is written beside its place and hard-linked in: ``link`` fails when the name exists, on
    local filesystems and NFS alike, so of several processes creating it at once exactly one wins, and
    a reader never sees half of it."""
    path = Path(path)
    tmp = _written_beside(path, data)
    try:
        os.link(tmp, path)
    except FileExistsError:
        return False
    finally:
        tmp.unlink(missing_ok=True)
    return True


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and (math.isnan(value) or math.isinf(value)):
        return None
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if hasattr(value, "item") and callable(value.item):  # numpy / torch scalars
        return _json_safe(value.item())
    if isinstance(value, Path):
        return str(value)
    return value


def _json_bytes(payload: Any) -> bytes:
    return (json.dumps(_json_safe(payload), indent=2, sort_keys=True) + "\n").encode("utf-8")


def atomic_write_json(path: str | os.PathLike, payload: Any) -> Path:
    return atomic_write_bytes(path, _json_bytes(payload))


def create_exclusive_json(path: str | os.PathLike, payload: Any) -> bool:
    """``create_exclusive_bytes`` for JSON."""
    return create_exclusive_bytes(path, _json_bytes(payload))


def read_json(path: str | os.PathLike, default: Any = None) -> Any:
    """The parsed file, ``default`` when it does not exist; ``DamagedFileError`` naming it when torn."""
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        return default
    text = data.decode("utf-8", errors="replace")
    try:
        return json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise DamagedFileError(
            f"{path} is damaged ({'empty file' if not text.strip() else error}); it was cut off or edited by hand."
        ) from None


def read_json_or_none(path: str | os.PathLike) -> Any:
    """Like ``read_json`` but a damaged file reads as absent (for readers that list many files)."""
    try:
        return read_json(path)
    except DamagedFileError:
        return None


def atomic_save_image(path: str | os.PathLike, image) -> Path:
    path = Path(path)
    tmp = _tmp_beside(path)
    try:
        image.save(tmp, format="PNG")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def atomic_write_dataframe(path: str | os.PathLike, frame) -> Path:
    path = Path(path)
    tmp = _tmp_beside(path)
    try:
        if path.suffix == ".parquet":
            frame.to_parquet(tmp, index=False)
        else:
            frame.to_csv(tmp, index=False)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def replace_dir(staging: Path, target: Path) -> Path:
    """Swap a fully written folder into place (weights, checkpoints)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(target, old)
    os.replace(staging, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return target


def staging_dir(target: Path) -> Path:
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".staging", dir=target.parent))
    os.chmod(staging, DIR_MODE)  # mkdtemp creates 0700; the swapped-in folder should read like mkdir's
    return staging


@dataclass(frozen=True)
class StudyPaths:
    """Where one study keeps everything. The layout is the contract between sweep, report and export."""

    root: Path

    @classmethod
    def of(cls, paths_root: str | os.PathLike, study: str) -> StudyPaths:
        return cls(Path(paths_root) / study)

    @property
    def storage_db(self) -> Path:
        return self.root / "study.db"

    @property
    def study_json(self) -> Path:  # study-level facts: objectives, params, baseline, model, method
        return self.root / "study.json"

    @property
    def results_csv(self) -> Path:
        return self.root / "results.csv"

    @property
    def results_parquet(self) -> Path:
        return self.root / "results.parquet"

    @property
    def baseline(self) -> Path:  # metrics.json, grid.png, samples/ of the untuned model
        return self.root / "baseline"

    @property
    def cache(self) -> Path:  # latents, text embeddings, class images, reference stats
        return self.root / "cache"

    @property
    def runs(self) -> Path:  # training checkpoints of milestone-sharing runs
        return self.root / "runs"

    @property
    def wandb(self) -> Path:
        return self.root / "wandb"

    @property
    def report_html(self) -> Path:
        return self.root / "report.html"

    @property
    def report_md(self) -> Path:
        return self.root / "report.md"

    def trial(self, number: int) -> Path:
        return self.root / "trials" / f"{number:04d}"

    def trial_dirs(self) -> list[Path]:
        folder = self.root / "trials"
        return (
            sorted(p for p in folder.iterdir() if p.is_dir() and p.name.isdigit()) if folder.exists() else []
        )


# Inside each trial folder (and the baseline folder):
TRIAL_CONFIG = "config.yaml"  # the resolved config the trial ran with
TRIAL_METRICS = "metrics.json"  # see sdsweep.study.record.TrialRecord
TRIAL_GRID = "grid.png"  # labelled prompt x seed grid of the final evaluation
TRIAL_SAMPLES = "samples"  # samples/p{prompt:02d}_s{seed}.png
TRIAL_WEIGHTS = "weights"  # diffusers format for the method (pipeline folder / LoRA / embeddings)


def sample_name(prompt_index: int, seed: int) -> str:
    return f"p{prompt_index:02d}_s{seed}.png"
