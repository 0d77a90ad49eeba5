"""A composed Hydra config or a saved YAML file -> a validated ``Config``, and a ``Config`` back to YAML.

The one path every config takes in: unknown keys are rejected (Hydra's ``+key`` bypasses the typed
schema), the sweep shorthands are folded into ``sweep.params`` (``normalise``), then ``validate`` runs.
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
import warnings
from typing import Any

from omegaconf import DictConfig, OmegaConf

from sdsweep.config.methods import load_plugins
from sdsweep.config.resolve import sweep_params
from sdsweep.config.schema import Config
from sdsweep.config.validate import validate
from sdsweep.errors import ConfigError


def _schema_of(annotation: Any) -> Any:
    """The dataclass a field holds, or ("dict"|"list", dataclass) for containers of dataclasses."""
    origin = typing.get_origin(annotation)
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if origin is typing.Union and len(args) == 1:
        return _schema_of(args[0])
    if dataclasses.is_dataclass(annotation):
        return annotation
    if origin in (dict, list) and args and dataclasses.is_dataclass(args[-1]):
        return (origin.__name__, args[-1])
    return None


def _valid_keys(schema: type, prefix: str = "") -> list[str]:
    keys = []
    for name, annotation in typing.get_type_hints(schema).items():
        dotted = f"{prefix}{name}"
        keys.append(dotted)
        inner = _schema_of(annotation)
        if dataclasses.is_dataclass(inner):
            keys.extend(_valid_keys(inner, f"{dotted}."))
    return keys


def unknown_keys(node: Any, schema: type = None, prefix: str = "") -> list[str]:  # type: ignore[assignment]
    """Dotted keys in a composed config that the schema does not have (typos added with ``+``)."""
    schema = schema or Config
    hints = typing.get_type_hints(schema)
    found = []
    for key, value in node.items():
        dotted = f"{prefix}{key}"
        if key not in hints:
            if not (prefix == "" and key == "hydra"):
                found.append(dotted)
            continue
        inner = _schema_of(hints[key])
        if dataclasses.is_dataclass(inner) and isinstance(value, dict):
            found.extend(unknown_keys(value, inner, f"{dotted}."))
        elif isinstance(inner, tuple) and inner[0] == "dict" and isinstance(value, dict):
            for name, item in value.items():
                if isinstance(item, dict):
                    found.extend(unknown_keys(item, inner[1], f"{dotted}.{name}."))
        elif isinstance(inner, tuple) and inner[0] == "list" and isinstance(value, list):
            for index, item in enumerate(value):
                if isinstance(item, dict):
                    found.extend(unknown_keys(item, inner[1], f"{dotted}[{index}]."))
    return found


def reject_unknown_keys(raw: DictConfig) -> None:
    """Hydra's ``+key=value`` adds keys the typed schema never sees; a typo would pass silently."""
    container = OmegaConf.to_container(raw, resolve=False)
    unknown = unknown_keys(container)
    if not unknown:
        return
    valid = _valid_keys(Config)
    lines = []
    for key in unknown:
        close = difflib.get_close_matches(key, valid, n=1, cutoff=0.6)
        lines.append(f"'{key}'" + (f" (did you mean {close[0]}?)" if close else ""))
    raise ConfigError(
        f"Unknown config key{'s' if len(lines) > 1 else ''} {', '.join(lines)}. Fix the spelling (and drop the "
        "'+', which adds new keys); the valid keys are in conf/ and sdsweep/config/schema.py."
    )


def normalise(cfg: Config) -> Config:
    """The one step that rewrites a config: the sweep shorthands become ``sweep.params`` entries, and
    ``eval.protocol=heldout_captions`` brings its paired LPIPS (the reference protocol: FID + LPIPS on
    the test-set captions) without editing ``eval.metrics``.

    The legacy ``method.use_8bit_adam=true`` becomes ``train.optimizer=adamw8bit`` here, with a deprecation
    note, and is read nowhere else.

    Called where configs are built (``to_typed``, ``load_yaml``), before ``validate``, which only reads."""
    if cfg.method.use_8bit_adam:
        warnings.warn(
            "method.use_8bit_adam is deprecated; it is the same as train.optimizer=adamw8bit, which is what "
            "this run uses"
            + (
                ""
                if cfg.train.optimizer == "adamw"
                else f" unless another optimizer is set (here {cfg.train.optimizer})"
            )
            + ". Write train.optimizer=adamw8bit instead.",
            FutureWarning,
            stacklevel=2,
        )
        if cfg.train.optimizer == "adamw":
            cfg.train.optimizer = "adamw8bit"
        cfg.method.use_8bit_adam = False
    if cfg.eval.protocol == "heldout_captions" and "lpips" not in cfg.eval.metrics:
        cfg.eval.metrics = [*cfg.eval.metrics, "lpips"]
    if cfg.sweep is not None:
        cfg.sweep.params = sweep_params(cfg.sweep)
        if cfg.sweep.name == "single" and not cfg.sweep.params:
            # A config saved before sweep.single_run existed: its one-run sweep was known by this name only.
            cfg.sweep.single_run = True
    return cfg


def to_typed(cfg: DictConfig | Config) -> Config:
    """A composed DictConfig -> a validated ``Config`` dataclass with interpolations resolved."""
    if isinstance(cfg, Config):
        return validate(normalise(cfg))
    reject_unknown_keys(cfg)
    typed = OmegaConf.to_object(cfg)
    if not isinstance(typed, Config):  # composed without the schema (e.g. a saved trial config)
        merged = OmegaConf.merge(OmegaConf.structured(Config), cfg)
        typed = OmegaConf.to_object(merged)
    return validate(normalise(typed))


def to_yaml(cfg: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def config_from_yaml(text: str) -> Config:
    """A built config's resolved YAML (``to_yaml``) -> the same typed ``Config``, without Hydra.

    What a run's processes use: the config was composed, normalised, fixed up and validated once when the
    run was claimed (``sdsweep.sweep.run_config.build_config``), so it is only typed again here."""
    load_plugins()  # a plugin method's options are part of the schema the text is read against
    merged = OmegaConf.merge(OmegaConf.structured(Config), OmegaConf.create(text))
    return OmegaConf.to_object(merged)


def load_yaml(path: str) -> Config:
    """A config file a person or an older sdsweep wrote: typed, normalised and validated."""
    load_plugins()  # a plugin method's options are part of the schema the file is read against
    merged = OmegaConf.merge(OmegaConf.structured(Config), OmegaConf.load(path))
    return validate(normalise(OmegaConf.to_object(merged)))
