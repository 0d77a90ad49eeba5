"""What a file or folder holds, not where it is: content hashes, cached by (path, size, mtime).

A study's identity (sdsweep/sweep/fingerprint.py) and its caches (latents, class images) name data and
models by these hashes, so the same files seen through another path (a moved study, another mount point,
a copy) are the same files. Each file is read once per (resolved path, size, mtime): a model of several
gigabytes is hashed the first time a machine sees it there, and only looked up (a stat) afterwards.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from sdsweep import io

CONTENT_PREFIX = "content:"  # a value that names content, not a place


def file_hashes(paths: list[Path], cache_file: Path | None) -> dict[Path, str]:
    """SHA-256 of each file's bytes, reusing cached hashes whose (size, mtime) still match."""
    cached = _read_cache(cache_file)
    out, fresh = {}, {}
    for path in paths:
        key = str(Path(path).resolve())
        stat = Path(path).stat()
        entry = cached.get(key)
        if entry and entry.get("size") == stat.st_size and entry.get("mtime_ns") == stat.st_mtime_ns:
            out[path] = entry["sha256"]
            continue
        out[path] = sha256_of_file(Path(path))
        fresh[key] = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": out[path]}
    if fresh and cache_file is not None:
        _merge_cache(cache_file, fresh)
    return out


def sha256_of_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def folder_identity(
    folder: str | os.PathLike, cache_file: Path | None, subfolders: tuple[str, ...] = ()
) -> str:
    """``content:<hash>`` of every file under ``folder`` (or only under ``subfolders``): relative name and
    SHA-256 of its bytes. The same model copied or mounted elsewhere has the same identity."""
    root = Path(os.path.expanduser(str(folder)))
    tops = [root / sub for sub in subfolders] if subfolders else [root]
    files = sorted(
        p
        for top in tops
        if top.is_dir()
        for p in top.rglob("*")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts)
    )
    hashes = file_hashes(files, cache_file)
    digest = hashlib.sha256()
    for file in files:
        digest.update(f"{file.relative_to(root).as_posix()}:{hashes[file]}\n".encode())
    return f"{CONTENT_PREFIX}{digest.hexdigest()[:24]}"


def _read_cache(cache_file: Path | None) -> dict:
    if cache_file is None:
        return {}
    try:
        return io.read_json(cache_file, {}) or {}
    except io.DamagedFileError:
        return {}  # a cache: rebuilt, never trusted when torn


def _merge_cache(cache_file: Path, fresh: dict) -> None:
    """Add ``fresh`` to the cache file under a lock, so processes hashing side by side keep each other's work."""
    try:
        with io.file_lock(cache_file.with_name(f".{cache_file.name}.lock")):
            io.atomic_write_json(cache_file, {**_read_cache(cache_file), **fresh})
    except OSError:
        pass  # a read-only cache only costs the re-hash next time
