"""Hugging Face datasets on disk (``data=hf``): a folder written by ``Dataset.save_to_disk`` /
``DatasetDict.save_to_disk``, or a folder of parquet files (the hub's ``data/train-00000-of-00001.parquet``),
read through the ``datasets`` library (``pip install 'sdsweep[datasets]'``).

Images stored as bytes (the ``Image`` feature, as in the Pokémon BLIP captions set) are written once to
content-addressed files under ``<cache>/hf-images`` so the rest of sdsweep (verification, latent cache,
fingerprint) sees ordinary image files; the same bytes always land in the same file.
"""

from __future__ import annotations

import hashlib
import io as _io
from pathlib import Path
from typing import Any

from sdsweep import io

IMAGE_COLUMNS = ("image", "img", "file_name", "path")
CAPTION_COLUMNS = ("text", "caption", "prompt", "captions")
HELDOUT_SPLITS = ("test", "validation", "valid", "val")


def _datasets(error: type[Exception]):
    try:
        import datasets
    except ImportError:
        raise error(
            "data=hf reads datasets through the `datasets` library, which is not installed. "
            "Install it with: pip install 'sdsweep[datasets]' (or pip install datasets)."
        ) from None
    return datasets


def _parquet_splits(folder: Path) -> dict[str, list[str]]:
    """Parquet files by split, from the hub's names (``train-00000-of-00001.parquet``, ``train/0.parquet``)."""
    splits: dict[str, list[str]] = {}
    for path in sorted(folder.rglob("*.parquet")):
        stem = path.stem.split("-")[0]
        parent = path.parent.name if path.parent != folder else ""
        split = stem if stem in ("train", *HELDOUT_SPLITS) else (parent or "train")
        splits.setdefault(split, []).append(str(path))
    return splits


def load_splits(folder: Path, cache: Path, error: type[Exception]) -> tuple[dict[str, Any], str]:
    """Every split of the dataset in ``folder`` as a ``datasets.Dataset``, and a description of the source."""
    datasets = _datasets(error)
    if (folder / "dataset_dict.json").is_file() or (folder / "state.json").is_file():
        loaded = datasets.load_from_disk(str(folder))
        if isinstance(loaded, datasets.DatasetDict):
            return dict(loaded), "a dataset saved with save_to_disk"
        return {"train": loaded}, "a dataset saved with save_to_disk"
    files = _parquet_splits(folder)
    if not files:
        raise error(
            f"data.path={folder} holds neither a dataset saved with save_to_disk (dataset_dict.json or state.json) "
            "nor parquet files. Point data.path at such a folder, or use data=imagefolder for image files."
        )
    splits = {
        split: datasets.Dataset.from_parquet(paths, cache_dir=str(cache / "hf-datasets"))
        for split, paths in files.items()
    }
    return splits, "parquet files"


def pick_column(
    columns: list[str], wanted: str | None, candidates: tuple[str, ...], what: str, source: str, error
):
    if wanted:
        if wanted not in columns:
            raise error(
                f"The {what} column '{wanted}' (data.{what}_column) is not in {source}; its columns are {columns}. "
                f"Set data.{what}_column to one of them."
            )
        return wanted
    for name in candidates:
        if name in columns:
            return name
    raise error(
        f"Could not find the {what} column in {source}: looked for {list(candidates)}, found {columns}. "
        f"Set data.{what}_column=<name>."
    )


def _image_bytes(value: Any, row: int, source: str, error) -> tuple[bytes, str]:
    """The stored bytes of one image cell and a file suffix."""
    if isinstance(value, dict) and value.get("bytes"):
        data = value["bytes"]
    elif isinstance(value, dict) and value.get("path"):
        data = Path(value["path"]).read_bytes()
    elif isinstance(value, (bytes, bytearray)):
        data = bytes(value)
    elif hasattr(value, "save"):  # a decoded PIL image
        buffer = _io.BytesIO()
        value.save(buffer, format="PNG")
        data = buffer.getvalue()
    else:
        raise error(
            f"Row {row} of {source}: the image cell is {type(value).__name__}, not image bytes or a path."
        )
    suffix = ".png" if data[:8] == b"\x89PNG\r\n\x1a\n" else ".jpg" if data[:2] == b"\xff\xd8" else ".img"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        suffix = ".webp"
    return data, suffix


def materialise(data: bytes, suffix: str, cache: Path) -> Path:
    """A content-addressed file holding ``data`` (written once, atomically)."""
    digest = hashlib.sha256(data).hexdigest()
    path = cache / "hf-images" / digest[:2] / f"{digest}{suffix}"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        io.atomic_write_bytes(path, data)
    return path


def read_rows(
    folder: Path,
    split: str,
    image_column: str | None,
    caption_column: str | None,
    cache: Path,
    error: type[Exception],
) -> tuple[list[tuple[Path, str]], list[tuple[Path, str]], list[str], str]:
    """``(train, heldout, notes, source)``: (image file, caption) pairs of ``split`` and of the first held-out
    split that exists (test / validation), each image written to the cache from its bytes."""
    splits, source = load_splits(folder, cache, error)
    if split not in splits:
        raise error(f"data.split={split} is not a split of {folder}; its splits are {sorted(splits)}.")
    heldout_split = next((s for s in HELDOUT_SPLITS if s in splits and s != split), None)
    notes = [f"split {split}: {len(splits[split])} row(s)"]
    if heldout_split:
        notes.append(f"held-out images come from split {heldout_split} ({len(splits[heldout_split])} row(s))")
    out = []
    for name in [split] + ([heldout_split] if heldout_split else []):
        table = splits[name]
        label = f"split {name} of {folder}"
        columns = list(table.column_names)
        image = pick_column(columns, image_column, IMAGE_COLUMNS, "image", label, error)
        caption = pick_column(columns, caption_column, CAPTION_COLUMNS, "caption", label, error)
        features = table.features
        if hasattr(features.get(image), "decode"):
            table = table.cast_column(image, type(features[image])(decode=False))
        pairs = []
        for row, record in enumerate(table.select_columns([image, caption]), 1):
            text = record[caption]
            text = text[0] if isinstance(text, list) and text else text
            if not isinstance(text, str) or not text.strip():
                raise error(f"Row {row} of {label} has no caption in column '{caption}'; fill it in.")
            value = record[image]
            if isinstance(value, str):  # a path column, relative to the dataset folder
                path = Path(value) if Path(value).is_absolute() else folder / value
            else:
                path = materialise(*_image_bytes(value, row, label, error), cache)
            pairs.append((path, text))
        out.append(pairs)
    return out[0], (out[1] if heldout_split else []), notes, f"Hugging Face dataset ({source}, split {split})"
