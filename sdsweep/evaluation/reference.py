"""The reference images FID/KID compare against, and their features cached once per study."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from PIL import Image

from sdsweep import io
from sdsweep.data.examples import IMAGE_SUFFIXES
from sdsweep.data.images import open_rgb
from sdsweep.errors import ConfigError


def load_reference_dir(folder: str | Path) -> list[Image.Image]:
    """Every image in ``eval.reference_dir`` (sorted, so the cache key is stable)."""
    path = Path(folder).expanduser()
    files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES) if path.is_dir() else []
    if not files:
        raise ConfigError(
            f"eval.reference_dir={str(folder)!r} is not a folder with images (.png/.jpg/.webp/.bmp). Point it at "
            "the real images FID/KID should compare against, or set eval.reference_dir=null to use the held-out images."
        )
    return [open_rgb(file) for file in files]


def choose_feature_kind(kind: str, warnings: list[str]) -> str:
    """``eval.fid_features`` resolved: ``auto`` takes Inception where torch-fidelity is installed (saying
    so in ``warnings``), else CLIP image features."""
    from sdsweep.config.features import torch_fidelity_available

    if kind != "auto":
        return kind
    if torch_fidelity_available():
        warnings.append("eval.fid_features=auto: using Inception features (torch-fidelity found).")
        return "inception"
    warnings.append(
        "eval.fid_features=auto: torch-fidelity is not installed, so FID/KID use CLIP image features; "
        "they rank trials but are not comparable with published Inception FIDs."
    )
    return "clip"


def feature_identity(source: str, cache: str | None) -> str:
    """What keys the reference features: a local model folder by its content (not its name, not where it
    lives), so a rebuilt CLIP never hits stale statistics and the same CLIP under another cache folder or
    mount reuses them; a hub id as it is."""
    if not Path(source).is_dir():
        return source
    from sdsweep.content import folder_identity
    from sdsweep.models.tiny import file_hash_cache

    return folder_identity(source, file_hash_cache(cache))


def reference_key(images: Sequence[Image.Image], feature_id: str, resolution: int) -> str:
    digest = hashlib.sha256(f"{feature_id}|{resolution}|{len(images)}".encode())
    for image in images:
        digest.update(f"{image.size}".encode())
        digest.update(image.convert("RGB").tobytes())
    return digest.hexdigest()[:24]


def cached_reference_features(
    cache_dir: Path, key: str, compute: Callable[[], torch.Tensor]
) -> tuple[torch.Tensor, bool]:
    """(features, came_from_cache). Computed once per study; trials and re-runs read the file."""
    from safetensors.torch import load_file, save

    path = cache_dir / f"{key}.safetensors"
    if path.exists():
        try:
            return load_file(path)["features"], True
        except Exception:  # an unreadable cache file is rebuilt, never fatal
            pass
    features = compute().contiguous()
    io.atomic_write_bytes(path, save({"features": features}))
    return features, False
