"""The shapes model's id grammar: ``shapes:sd15`` is the default build (seed 0), ``shapes:sd15@seed3`` the build
pretrained with seed 3 (another model of the same world). Pure strings, so config validation can check that
a study's model and its CLIP come from one build before anything loads; ``sdsweep.models.shapes`` maps a
build to its cache folder (``sd15-v<version>`` for seed 0, ``sd15-v<version>-seed<N>`` otherwise).
"""

from __future__ import annotations

import re

from sdsweep.errors import ConfigError

SHAPES_PREFIX = "shapes:"
_SEED_TAG = re.compile(r"seed(\d+)")
# A CLIP folder inside a shapes build, as eval.clip_model was written before the ids: .../shapes/sd15-v3/clip
_CLIP_FOLDER = re.compile(r"(?:^|/)shapes/(\w+?)-v\d+(?:-seed(\d+))?/clip/?$")


def parse_shapes_build(name: str) -> tuple[str, int] | None:
    """``shapes:sd15`` -> ("sd15", 0); ``shapes:sd15@seed3`` -> ("sd15", 3); anything not ``shapes:`` -> None."""
    if not name.startswith(SHAPES_PREFIX):
        return None
    flavour, _, tag = name[len(SHAPES_PREFIX) :].partition("@")
    flavour = flavour or "sd15"
    if not tag:
        return flavour, 0
    match = _SEED_TAG.fullmatch(tag)
    if not match:
        raise ConfigError(
            f"{name!r} is not a shapes model id: write shapes:{flavour} (the default build) or "
            f"shapes:{flavour}@seed<N> (the build pretrained with seed N, e.g. shapes:{flavour}@seed3)."
        )
    return flavour, int(match.group(1))


def shapes_id(flavour: str = "sd15", seed: int = 0) -> str:
    return f"{SHAPES_PREFIX}{flavour}" + (f"@seed{seed}" if seed else "")


def clip_build(clip_model: str) -> tuple[str, int] | None:
    """The shapes build an eval.clip_model names: a ``shapes:`` id, or a folder ``.../shapes/<build>/clip``."""
    build = parse_shapes_build(clip_model)
    if build is not None:
        return build
    match = _CLIP_FOLDER.search(clip_model.replace("\\", "/"))
    return (match.group(1), int(match.group(2) or 0)) if match else None


def check_shapes_clip(pretrained: str, clip_model: str) -> None:
    """A shapes model scored by another shapes build's CLIP is a ConfigError: each build trains its own CLIP
    (and text encoder) together, so another build's CLIP scores in a different embedding space."""
    model, clip = parse_shapes_build(pretrained), clip_build(clip_model)
    if model is None or clip is None or model == clip:
        return
    raise ConfigError(
        f"model.pretrained={pretrained!r} and eval.clip_model={clip_model!r} are different shapes builds: "
        f"each build trains its own CLIP, so score it with its own. Set eval.clip_model={shapes_id(*model)} "
        f"(or model.pretrained={shapes_id(*clip)})."
    )
