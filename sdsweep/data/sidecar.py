"""Sidecar captions, the layout of kohya sd-scripts, OneTrainer and ai-toolkit: ``image.png`` with
``image.txt`` (or ``data.caption_extension``) beside it, optionally in kohya's ``<repeats>_<name>``
sub-folders (``10_sks dog/``), whose repeat count sets how often each of its images is drawn.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

REPEAT_FOLDER = re.compile(r"^(\d+)_(.+)$")


@dataclass(frozen=True)
class SidecarFolder:
    path: Path
    repeats: int
    images: list[Path]


def _images_in(folder: Path, suffixes: tuple[str, ...]) -> list[Path]:
    return sorted(
        p
        for p in folder.iterdir()
        if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in suffixes
    )


def repeat_folders(root: Path, suffixes: tuple[str, ...]) -> list[SidecarFolder]:
    """The root's own images (repeats 1) and every ``<repeats>_<name>`` sub-folder, sorted by name."""
    folders = []
    own = _images_in(root, suffixes)
    if own:
        folders.append(SidecarFolder(root, 1, own))
    for sub in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        match = REPEAT_FOLDER.match(sub.name)
        if match:
            folders.append(SidecarFolder(sub, int(match.group(1)), _images_in(sub, suffixes)))
    return folders


def has_sidecars(root: Path, extension: str, suffixes: tuple[str, ...]) -> bool:
    """Whether ``root`` is a sidecar-caption dataset: a caption file beside any image, or repeat folders."""
    for folder in repeat_folders(root, suffixes):
        if folder.path != root or any(p.with_suffix(extension).is_file() for p in folder.images):
            return True
    return False


def normalise_extension(extension: str) -> str:
    return extension if extension.startswith(".") else "." + extension


def read_sidecars(
    root: Path,
    extension: str,
    default_caption: str | None,
    suffixes: tuple[str, ...],
    error: type[Exception],
    decode: Callable[[Path, list[str]], str],
) -> tuple[list[tuple[Path, str, int]], list[str]]:
    """``(image, caption, repeats)`` for every image under ``root``, and notes for the data summary.

    An image without its caption file is an error listing every such image, unless ``default_caption``
    (data.instance_prompt) is set; an empty caption file is kept (the image trains with an empty caption,
    as in kohya) and counted in the notes.
    """
    extension = normalise_extension(extension)
    folders = repeat_folders(root, suffixes)
    items: list[tuple[Path, str, int]] = []
    missing: list[Path] = []
    empty: list[Path] = []
    notes: list[str] = []
    for folder in folders:
        for image in folder.images:
            sidecar = image.with_suffix(extension)
            if not sidecar.is_file():
                missing.append(image)
                if default_caption is None:
                    continue
                caption = default_caption
            else:
                caption = " ".join(decode(sidecar, notes).split())  # one line, as kohya joins them
                if not caption:
                    empty.append(sidecar)
            items.append((image, caption, folder.repeats))
    if missing and default_caption is None:
        shown = ", ".join(str(p.relative_to(root)) for p in missing[:10])
        more = f" and {len(missing) - 10} more" if len(missing) > 10 else ""
        raise error(
            f"{len(missing)} image(s) in {root} have no {extension} caption file beside them: {shown}{more}. "
            f"Add the caption files, or set data.instance_prompt='<caption>' to use that caption for them "
            f"(data.caption_extension sets the suffix, e.g. .caption)."
        )
    if missing:
        notes.append(
            f"{len(missing)} image(s) without a {extension} file use data.instance_prompt as caption"
        )
    if empty:
        shown = ", ".join(str(p.relative_to(root)) for p in empty[:5])
        notes.append(f"{len(empty)} caption file(s) are empty and train with an empty caption: {shown}")
    repeated = [f for f in folders if f.path != root or f.repeats != 1]
    for folder in repeated:
        notes.append(f"folder {folder.path.name}: {folder.repeats} repeat(s), {len(folder.images)} image(s)")
    return items, notes


def skipped_sidecar_files(root: Path, extension: str, suffixes: tuple[str, ...]) -> list[tuple[str, str]]:
    """Files that are neither images nor caption files, and sub-folders not named ``<repeats>_<name>``
    (kohya ignores them too)."""
    extension = normalise_extension(extension)
    skipped = []
    for folder in [root] + [f.path for f in repeat_folders(root, suffixes) if f.path != root]:
        for path in sorted(folder.iterdir()):
            name = str(path.relative_to(root))
            if path.name.startswith("."):
                continue
            if path.is_dir():
                if folder == root and not REPEAT_FOLDER.match(path.name):
                    skipped.append((name, "a folder not named <repeats>_<name>, e.g. 10_sks dog"))
            elif path.suffix.lower() not in suffixes and path.suffix != extension:
                skipped.append((name, f"not an image type sdsweep reads ({path.suffix or 'no suffix'})"))
    return skipped
