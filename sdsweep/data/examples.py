"""The training data as (image, caption) examples: listed from the metadata or the instance folder,
every image verified, summarised for the terminal and model card, and split into train and held-out.

Every image is opened and verified when the dataset is listed, so a missing or corrupt file is
reported by name before any model is loaded.
"""

from __future__ import annotations

import csv
import io
import json
import random
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError

from sdsweep.config.schema import Config

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif")
IMAGE_COLUMNS = ("file_name", "image", "image_file", "path", "filename")
CAPTION_COLUMNS = ("text", "caption", "prompt", "captions")
METADATA_FILES = ("metadata.jsonl", "metadata.csv")
MAX_CAPTION_TOKENS = 77  # CLIP's context, start and end tokens included: longer captions are cut short


class DataError(ValueError):
    """The training data cannot be used; the message names the file or column and the fix."""


@dataclass(frozen=True)
class Example:
    image_path: Path
    caption: str
    repeats: int = 1  # kohya's <repeats>_<name> folders: drawn this many times per pass over the data
    heldout: bool = False  # from a held-out split of the dataset (data=hf with a test/validation split)


# ---- listing ---------------------------------------------------------------------------------------
def decode_text(path: Path, notes: list[str] | None = None) -> str:
    """A metadata file as text: UTF-8 with or without BOM (Excel writes one), UTF-16 with BOM, else
    Windows-1252 (Excel's "CSV" on Western Windows, a superset of Latin-1's printable range) with a note."""
    data = path.read_bytes()
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        return data.decode("utf-16")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        utf8_error = error
    if b"\x00" in data:
        raise DataError(
            f"{path} is not text in a known encoding ({utf8_error}). Save it as UTF-8 (in Excel: "
            "'CSV UTF-8'; in Python: open(..., 'w', encoding='utf-8'))."
        )
    for encoding in ("cp1252", "latin-1"):
        try:
            text = data.decode(encoding)
        except UnicodeDecodeError:
            continue
        if notes is not None:
            notes.append(
                f"{path.name} is not UTF-8; it was read as {encoding} (check accented captions, or save it as UTF-8)"
            )
        return text
    raise DataError(f"{path} is not UTF-8 ({utf8_error}); save it as UTF-8.")  # latin-1 never fails


def find_metadata_folder(folder: Path) -> Path:
    """``folder`` itself, or its ``train/`` split (the Hugging Face layout ``folder/train/metadata.jsonl``)."""
    if any((folder / name).exists() for name in METADATA_FILES):
        return folder
    split = folder / "train"
    if split.is_dir() and any((split / name).exists() for name in METADATA_FILES):
        return split
    return folder


def _read_rows(
    folder: Path, notes: list[str] | None = None, cfg_extension: str = ".txt"
) -> tuple[list[dict[str, Any]], Path]:
    jsonl = folder / "metadata.jsonl"
    if jsonl.exists():
        rows = []
        for number, line in enumerate(decode_text(jsonl, notes).splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise DataError(
                    f"{jsonl} line {number} is not valid JSON ({error.msg}); fix or remove that line."
                ) from None
            if not isinstance(row, dict):
                raise DataError(f"{jsonl} line {number} is not a JSON object; write one {{...}} per image.")
            rows.append(row)
        return rows, jsonl
    table = folder / "metadata.csv"
    if table.exists():
        return list(csv.DictReader(io.StringIO(decode_text(table, notes), newline=""))), table
    has_images = any(p.suffix.lower() in IMAGE_SUFFIXES for p in folder.iterdir())
    hint = (
        " The folder holds images without captions: use data=instances with data.instance_prompt='a photo of sks dog'."
        if has_images
        else ""
    )
    raise DataError(
        f"No metadata.jsonl or metadata.csv in {folder}. Add one with a line per image, e.g. "
        '{"file_name": "001.png", "text": "a photo of sks dog"} (the Hugging Face layout with a train/ '
        "folder holding metadata.jsonl is found too), or put a caption file beside each image (001.png with "
        f"001{cfg_extension}, the kohya layout)." + hint
    )


def _pick_column(
    columns: list[str], wanted: str | None, candidates: tuple[str, ...], what: str, source: Path
) -> str:
    if wanted:
        if wanted not in columns:
            raise DataError(
                f"The {what} column '{wanted}' (data.{what}_column) is not in {source}; its columns are "
                f"{columns}. Set data.{what}_column to one of them, or leave it unset to detect it."
            )
        return wanted
    for name in candidates:
        if name in columns:
            return name
    raise DataError(
        f"Could not find the {what} column in {source}: looked for {list(candidates)}, found {columns}. "
        f"Set data.{what}_column=<name>."
    )


def _caption_of(value: Any, row_number: int, source: Path, fallback: str | None) -> str:
    # Several captions per image (a list): the first is used, so captions (and their cached text
    # embeddings) stay fixed per image.
    if isinstance(value, list):
        value = value[0] if value else None
    if value is None or (isinstance(value, str) and not value.strip()):
        if fallback is not None:
            return fallback
        raise DataError(
            f"Row {row_number} of {source} has no caption. Fill it in, or set data.instance_prompt to use one "
            "prompt for uncaptioned images."
        )
    return str(value)


def _imagefolder_examples(folder: Path, cfg: Config, notes: list[str] | None = None) -> list[Example]:
    rows, source = _read_rows(folder, notes, cfg.data.caption_extension)
    if not rows:
        raise DataError(f"{source} lists no images; add at least one line.")
    columns = list(dict.fromkeys(key for row in rows for key in row))
    image_column = _pick_column(columns, cfg.data.image_column, IMAGE_COLUMNS, "image", source)
    caption_column = _pick_column(columns, cfg.data.caption_column, CAPTION_COLUMNS, "caption", source)
    examples = []
    for number, row in enumerate(rows, 1):
        name = row.get(image_column)
        if not name:
            raise DataError(
                f"Row {number} of {source} has no '{image_column}' value; give the image's file name."
            )
        path = Path(str(name)).expanduser()
        path = path if path.is_absolute() else folder / path
        caption = _caption_of(row.get(caption_column), number, source, cfg.data.instance_prompt)
        examples.append(Example(path, caption))
    return examples


def _instance_examples(folder: Path, cfg: Config) -> list[Example]:
    if not cfg.data.instance_prompt:
        raise DataError(
            "data=instances needs data.instance_prompt, e.g. data.instance_prompt='a photo of sks dog'."
        )
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    return [Example(p, cfg.data.instance_prompt) for p in files]


def verify_image(path: Path) -> None:
    """Raise DataError unless ``path`` is a readable image (header check and a full decode)."""
    if not path.is_file():
        raise DataError(f"Image not found: {path}. Fix the path in the metadata or add the file.")
    try:
        with warnings.catch_warnings():
            # PIL only warns between MAX_IMAGE_PIXELS and twice that; such an image is refused too,
            # since decoding it costs gigabytes for a training image that is resized to 512-768 px.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                image.verify()  # structure and checksums; the image is unusable afterwards
            with Image.open(path) as image:
                image.load()  # truncated pixel data only shows on a full decode
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise DataError(
            f"Image {path} is too large to decode safely (over PIL's limit of {Image.MAX_IMAGE_PIXELS} pixels, "
            "a guard against decompression bombs). Downscale it (e.g. to 4096 px on the longer side) or remove it."
        ) from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        raise DataError(f"Image {path} is corrupt or not an image ({error}). Replace or remove it.") from None


@dataclass
class DataSummary:
    """What the dataset turned out to be, printed before training and kept for the model card."""

    folder: Path
    source: str  # the metadata file, or "instance prompt" / "demo"
    found: int  # images listed (imagefolder) or present (instances)
    used: int  # images used for training
    heldout: int  # images held out for val_loss and FID/KID references
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (file name, why)
    long_captions: list[str] = field(default_factory=list)  # image names whose caption gets cut short
    max_caption_tokens: int = MAX_CAPTION_TOKENS
    notes: list[str] = field(default_factory=list)  # encodings guessed, the train/ split used, ...

    def describe(self) -> str:
        """One paragraph for the terminal and the model card."""
        parts = [
            f"Data: {self.found} image(s) found in {self.folder} ({self.source}); "
            f"{self.used} used for training, {self.heldout} held out for evaluation."
        ]
        if self.skipped:
            shown = ", ".join(f"{name} ({why})" for name, why in self.skipped[:5])
            more = f" and {len(self.skipped) - 5} more" if len(self.skipped) > 5 else ""
            parts.append(f"{len(self.skipped)} file(s) skipped: {shown}{more}.")
        if self.long_captions:
            shown = ", ".join(self.long_captions[:3])
            more = f" and {len(self.long_captions) - 3} more" if len(self.long_captions) > 3 else ""
            parts.append(
                f"{len(self.long_captions)} caption(s) are longer than {self.max_caption_tokens} tokens and are "
                f"cut short for training (the text encoder's limit): {shown}{more}."
            )
        parts.extend(f"Note: {note}." for note in self.notes)
        return " ".join(parts)


@dataclass
class _Listing:
    folder: Path
    source: str
    examples: list[Example]
    skipped: list[tuple[str, str]]
    notes: list[str]


def _skipped_files(folder: Path, listed: set[Path]) -> list[tuple[str, str]]:
    skipped = []
    for path in sorted(folder.iterdir()):
        if not path.is_file() or path.name.startswith(".") or path.name in METADATA_FILES:
            continue
        if path.suffix.lower() not in IMAGE_SUFFIXES:
            skipped.append((path.name, f"not an image type sdsweep reads ({path.suffix or 'no suffix'})"))
        elif path.resolve() not in listed:
            skipped.append((path.name, "not listed in the metadata"))
    return skipped


def _dataset_folder(cfg: Config) -> Path:
    """The folder holding the images: the generated demo set for data=demo, else ``data.path``."""
    if cfg.data.kind == "demo":
        if cfg.data.path:
            raise DataError(
                f"data.path={cfg.data.path} is set but data=demo ignores it. Add data=imagefolder (captions in "
                "metadata.jsonl/csv) or data=instances (one prompt for all images)."
            )
        from sdsweep.models import tiny

        return tiny.ensure_demo_dataset(cfg.data.demo_num_images, cfg.paths.cache)
    folder = Path(str(cfg.data.path)).expanduser()
    if not folder.is_dir():
        raise DataError(
            f"data.path={cfg.data.path} is not a folder. Point data.path at the folder holding your images."
        )
    return folder


def _list_dataset(cfg: Config) -> _Listing:
    notes: list[str] = []
    folder = _dataset_folder(cfg)
    if cfg.data.kind == "instances":
        examples = _instance_examples(folder, cfg)
        source = "one instance prompt"
    elif cfg.data.kind == "hf":
        from sdsweep.data import hf_dataset
        from sdsweep.models.tiny import cache_root

        train, heldout, hf_notes, source = hf_dataset.read_rows(
            folder,
            cfg.data.split,
            cfg.data.image_column,
            cfg.data.caption_column,
            cache_root(cfg.paths.cache),
            DataError,
        )
        notes.extend(hf_notes)
        examples = [Example(p, c) for p, c in train] + [Example(p, c, heldout=True) for p, c in heldout]
        skipped = []
    elif _is_sidecar_dataset(folder, cfg):
        from sdsweep.data import sidecar

        items, sidecar_notes = sidecar.read_sidecars(
            folder,
            cfg.data.caption_extension,
            cfg.data.instance_prompt,
            IMAGE_SUFFIXES,
            DataError,
            decode_text,
        )
        notes.extend(sidecar_notes)
        examples = [Example(path, caption, repeats) for path, caption, repeats in items]
        source = f"sidecar captions ({sidecar.normalise_extension(cfg.data.caption_extension)})"
        skipped = sidecar.skipped_sidecar_files(folder, cfg.data.caption_extension, IMAGE_SUFFIXES)
    else:
        found = find_metadata_folder(folder)
        if found != folder:
            notes.append(f"captions read from the Hugging Face train split {found}")
            folder = found
        examples = _imagefolder_examples(folder, cfg, notes)
        source = next(name for name in METADATA_FILES if (folder / name).exists())
    if not examples:
        raise DataError(
            f"The dataset in {folder} is empty: no images found (looked for {list(IMAGE_SUFFIXES)}). "
            "Add images or point data.path elsewhere."
        )
    if not source.startswith(("sidecar", "Hugging Face")):
        skipped = _skipped_files(folder, {e.image_path.resolve() for e in examples})
    return _Listing(folder, source, examples, skipped, notes)


def _is_sidecar_dataset(folder: Path, cfg: Config) -> bool:
    """An imagefolder without metadata.jsonl/csv whose images have caption files beside them (or that
    has kohya repeat folders)."""
    from sdsweep.data import sidecar

    if cfg.data.kind != "imagefolder" or find_metadata_folder(folder) != folder:
        return False
    if any((folder / name).exists() for name in METADATA_FILES):
        return False
    extension = sidecar.normalise_extension(cfg.data.caption_extension)
    return sidecar.has_sidecars(folder, extension, IMAGE_SUFFIXES)


def list_examples(cfg: Config) -> list[Example]:
    """The configured dataset as (image, caption) pairs, images not opened."""
    return _list_dataset(cfg).examples


def load_examples(cfg: Config) -> list[Example]:
    """The configured dataset as (image, caption) pairs, every image verified."""
    listing = _list_dataset(cfg)
    for example in listing.examples:
        verify_image(example.image_path)
    return listing.examples


def summarize_dataset(cfg: Config, count_tokens: Callable[[str], int] | None = None) -> DataSummary:
    """Verify every image and describe the dataset. ``count_tokens`` (the model's tokenizer, start
    and end tokens included) finds captions that will be cut short; without it, words are counted."""
    listing = _list_dataset(cfg)
    for example in listing.examples:
        verify_image(example.image_path)
    train, heldout = split_examples(listing.examples, cfg.data.num_heldout)
    count = count_tokens or (lambda text: len(text.split()) + 2)
    long_captions = [e.image_path.name for e in listing.examples if count(e.caption) > MAX_CAPTION_TOKENS]
    return DataSummary(
        folder=listing.folder,
        source=listing.source,
        found=len(listing.examples),
        used=len({e.image_path for e in train}),
        heldout=len(heldout),
        skipped=listing.skipped,
        long_captions=long_captions,
        notes=listing.notes,
    )


def split_examples(examples: list[Example], num_heldout: int) -> tuple[list[Example], list[Example]]:
    """A fixed pseudo-random ``num_heldout`` images are held out; the rest keep their order for training."""
    if num_heldout < 0:
        raise DataError(f"data.num_heldout={num_heldout} is negative; use 0 or more.")
    if len(examples) - num_heldout < 1:
        raise DataError(
            f"data.num_heldout={num_heldout} leaves no training images out of {len(examples)}; "
            "lower data.num_heldout or add images."
        )
    if any(e.heldout for e in examples):  # the dataset's own held-out split
        held = [e for e in examples if e.heldout][:num_heldout]
        train = [e for e in examples if not e.heldout for _ in range(max(1, e.repeats))]
        return train, held
    order = list(range(len(examples)))
    random.Random(0).shuffle(order)  # a constant seed: every trial of a study holds out the same images
    heldout_ids = set(order[len(order) - num_heldout :]) if num_heldout else set()
    # kohya's repeats: an image of a 10_ folder appears 10 times in the training list, so the seeded
    # sampler draws it 10 times as often; held-out images are evaluated once.
    train = [e for i, e in enumerate(examples) if i not in heldout_ids for _ in range(max(1, e.repeats))]
    heldout = [e for i, e in enumerate(examples) if i in heldout_ids]
    return train, heldout
