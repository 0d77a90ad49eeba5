"""Which values of a swept model/method/data group are available here: read from conf/ and the local model
cache, nothing downloaded. The preflight names what is missing; with ``sweep.skip_unavailable`` the run
config is built without it (``sdsweep.sweep.run_config.build_config``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from sdsweep.config.compose import CONF_DIR
from sdsweep.config.methods import method_spec
from sdsweep.config.schema import Config, ModelConfig, ParamSpec


@dataclass(frozen=True)
class MissingChoice:
    key: str  # the swept group: model | method | data
    value: str
    reason: str


def _group_choice_reason(cfg: Config, key: str, value: Any) -> str | None:
    from sdsweep.models.loading import is_hub_id, model_unavailable_reason

    if key == "method" and method_spec(str(value)) is not None:
        return None  # registered: a plugin stores its method=<name> entry in Hydra's ConfigStore, not conf/
    option = CONF_DIR / key / f"{value}.yaml"
    if not option.is_file():
        known = sorted(p.stem for p in (CONF_DIR / key).glob("*.yaml"))
        return f"there is no conf/{key}/{value}.yaml (known: {', '.join(known)})"
    if key == "model":
        node = OmegaConf.load(option)
        node.pop("defaults", None)
        model = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ModelConfig), node))
        reason = model_unavailable_reason(model, cfg.paths.cache)
        if reason and is_hub_id(model):
            return f"{reason}. Get it with `huggingface-cli download {model.pretrained} --local-dir /models/{value}`"
        if reason:
            return reason
    if key == "data":
        node = OmegaConf.load(option)
        path = node.get("path") if not OmegaConf.is_missing(node, "path") else cfg.data.path
        if path and not Path(str(path)).expanduser().is_dir():
            return f"its data.path {path!r} is not a folder"
    return None


def available_search_space(cfg: Config) -> tuple[dict[str, ParamSpec], list[MissingChoice]]:
    """The sweep's params with unavailable model/method/data choices removed, and what was removed.

    Pure apart from reading conf/ and the local model cache; downloads nothing.
    """
    if cfg.sweep is None:
        return {}, []
    params: dict[str, ParamSpec] = {}
    missing: list[MissingChoice] = []
    for key, spec in cfg.sweep.params.items():
        if key not in ("model", "method", "data") or spec.choices is None:
            params[key] = spec
            continue
        kept = []
        for value in spec.choices:
            reason = _group_choice_reason(cfg, key, value)
            if reason:
                missing.append(MissingChoice(key, str(value), reason))
            else:
                kept.append(value)
        params[key] = ParamSpec(**{**spec.__dict__, "choices": kept})
    return params, missing
