"""Defaults live in one place: no YAML value in ``conf/`` restates the typed schema's default.

Every file is merged onto a dataclass (``sdsweep/config/schema.py``; under ``method`` the schema of the
method the file names, ``sdsweep/config/methods.py``). A value that equals the dataclass default says
nothing, and it pins that value: a default later changed in code would be silently overridden by the
YAML. So a file sets only what differs, and a default it wants people to see is a comment
(``# learning_rate: 1e-5 (schema default) ...``).

Which schema a file is read against:

- ``conf/config.yaml``: ``Config`` (its ``defaults`` list and Hydra's own ``hydra:`` node aside);
- ``conf/<group>/<name>.yaml``: the ``Config`` field of that group (``model`` -> ``ModelConfig``, ...),
  or the package its ``# @package`` header names (``sweep`` -> ``SweepConfig``; ``_global_`` -> ``Config``);
- under ``method``: ``METHOD_SCHEMAS[<method.name>]``, the name the file sets, else the one it composes to
  (a recipe) -- the schema ``check_method_options`` holds the file to. Keys of another method (a recipe
  whose sweep switches methods) are read against the union ``MethodConfig``;
- nested dataclasses and dict-of-dataclass entries (``sweep.params.<key>``) are walked; a list is one value
  (``eval.metrics``, ``sweep.objectives``), compared whole with the default list.

Two exemptions, and only these:

1. Identity keys (``IDENTITY``): the key that says which option of its group a file is (``model.name``,
   the weights it loads, its native resolution, ``method.name``, ``data.kind``, ``tracking.backend``,
   ``sweep.name``). These describe the thing, not a knob: ``model=tiny`` must load the tiny model whatever
   ``ModelConfig``'s defaults become, so the file states them even where they equal the default.
2. Layered files: a file whose ``defaults`` list composes other configs under its own body (the recipes in
   ``conf/experiment/``, ``eval/tiny.yaml`` on ``eval/default.yaml``) may set a schema default only where it
   overrides a different value those configs set (``method.learning_rate: 1e-5`` over ``method=lora``'s
   1e-4). "Underneath" is measured by composing the file's defaults list alone, as command-line overrides;
   where that gives the same value, the line restates the default and fails like any other.
   ``conf/config.yaml`` layers over nothing that sets its keys, so it has no such exemption.
"""

from __future__ import annotations

import dataclasses
import functools
import typing
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import CONF_DIR, compose
from omegaconf import OmegaConf

from sdsweep.config.load import _schema_of
from sdsweep.config.methods import METHOD_SCHEMAS, MethodConfig
from sdsweep.config.schema import Config

IDENTITY = {
    "model.name",
    "model.pretrained",
    "model.resolution",
    "method.name",
    "data.kind",
    "tracking.backend",
    "sweep.name",
}
NOT_SCHEMA = {"hydra"}  # Hydra's own settings (conf/hydra/, the hydra: node of config.yaml)


def conf_files() -> list[Path]:
    return sorted(p for p in CONF_DIR.rglob("*.yaml") if p.relative_to(CONF_DIR).parts[0] not in NOT_SCHEMA)


def package(path: Path) -> str:
    """The node a file is merged into: its ``# @package`` header, else its group folder ('' for the root)."""
    for line in path.read_text().splitlines():
        if line.startswith("# @package"):
            name = line.split()[-1]
            return "" if name == "_global_" else name
    rel = path.relative_to(CONF_DIR)
    return ".".join(rel.parts[:-1])


def field_default(schema: type, name: str) -> Any:
    f = {f.name: f for f in dataclasses.fields(schema)}[name]
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return f.default


def as_plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value):
        return dataclasses.asdict(value)
    if isinstance(value, list):
        return [as_plain(v) for v in value]
    return value


def plain(node: Any) -> Any:
    return OmegaConf.to_container(node, resolve=False) if OmegaConf.is_config(node) else node


def method_schema(body: dict, composed_name: str) -> type:
    return METHOD_SCHEMAS.get(body.get("name", composed_name), MethodConfig)


def leaves(node: dict, schema: type, prefix: str, method_name: str):
    """(dotted key, value, schema default) for every leaf of ``node``, read against ``schema``."""
    for key, value in node.items():
        dotted = f"{prefix}{key}"
        if key == "defaults" or dotted in NOT_SCHEMA:
            continue
        owner = schema
        if prefix == "method." and key not in typing.get_type_hints(schema):
            owner = MethodConfig  # another method's option, set for a sweep that switches methods
        hints = typing.get_type_hints(owner)
        assert key in hints, (
            f"{dotted} is not in {owner.__name__}: the mapping of conf/ onto the schema is wrong"
        )
        inner = _schema_of(hints[key])
        if dotted == "method" and isinstance(value, dict):
            yield from leaves(value, method_schema(value, method_name), "method.", method_name)
        elif dataclasses.is_dataclass(inner) and isinstance(value, dict):
            yield from leaves(value, inner, f"{dotted}.", method_name)
        elif isinstance(inner, tuple) and inner[0] == "dict" and isinstance(value, dict):
            for entry, item in value.items():
                if isinstance(item, dict):
                    yield from leaves(item, inner[1], f"{dotted}.{entry}.", method_name)
        else:
            yield dotted, value, as_plain(field_default(owner, key))


def same(value: Any, default: Any) -> bool:
    """Equal as config values: 1 == 1.0, but a bool never equals a number (True == 1 in Python)."""
    if isinstance(value, bool) or isinstance(default, bool):
        return type(value) is type(default) and value == default
    if isinstance(value, list) and isinstance(default, list):
        return len(value) == len(default) and all(map(same, value, default))
    if isinstance(value, dict) and isinstance(default, dict):
        return value.keys() == default.keys() and all(same(value[k], default[k]) for k in value)
    return value == default


def layered_overrides(path: Path) -> list[str] | None:
    """The command-line overrides that compose what ``path``'s defaults list puts under its body; None for a
    file that layers over nothing (no defaults list) and for the primary config."""
    body = yaml.safe_load(path.read_text()) or {}
    if path == CONF_DIR / "config.yaml" or not body.get("defaults"):
        return None
    group = ".".join(path.relative_to(CONF_DIR).parts[:-1])
    overrides = []
    for entry in body["defaults"]:
        if entry == "_self_":
            continue
        if isinstance(entry, str):  # a sibling in the same group (eval/tiny.yaml: - default)
            overrides.append(f"{group}={entry}")
            continue
        ((key, value),) = entry.items()
        replaces = key.startswith("override ")
        key = key.removeprefix("override ").strip("/")
        overrides.append(f"{key}={value}" if replaces else f"+{key}={value}")
    return overrides


@functools.cache
def underneath(path: Path):
    """The raw config that ``path``'s defaults list composes (what its body lands on), or None."""
    overrides = layered_overrides(path)
    return None if overrides is None else compose(overrides, typed=False)


def file_leaves(path: Path, below=None):
    """Each leaf of a conf file as (global dotted key, value, schema default)."""
    body = yaml.safe_load(path.read_text()) or {}
    node = package(path)
    schema, prefix = Config, ""
    for part in [p for p in node.split(".") if p]:
        schema, prefix = _schema_of(typing.get_type_hints(schema)[part]), f"{prefix}{part}."
    method_name = path.stem  # a method file's own schema; a layered file's is the method it composes to
    if below is not None:
        method_name = str(OmegaConf.select(below, "method.name", default=""))
    if node == "method":
        schema = method_schema(body, method_name)
    return list(leaves(body, schema, prefix, method_name))


def restated_defaults(path: Path) -> list[str]:
    below = underneath(path)
    found = [
        (key, value)
        for key, value, default in file_leaves(path, below)
        if key not in IDENTITY and same(value, default)
    ]
    if below is not None:  # a layered file may restate a default over a different value set underneath
        found = [(key, value) for key, value in found if same(plain(OmegaConf.select(below, key)), value)]
    rel = path.relative_to(CONF_DIR.parent)
    return [f"{rel}: {key}: {value!r} is the schema default" for key, value in found]


def test_every_conf_file_is_read_against_a_schema():
    """Every key of every file maps to a schema field (a new group or package must be mapped, or its
    defaults would escape the check below), and the walk sees the values it should."""
    for path in conf_files():
        file_leaves(path, underneath(path))
    lora = {key: value for key, value, _ in file_leaves(CONF_DIR / "method" / "lora.yaml")}
    assert lora["method.learning_rate"] == 1e-4
    demo = dict(
        (key, default)
        for key, _, default in file_leaves(
            CONF_DIR / "experiment" / "demo_methods.yaml",
            underneath(CONF_DIR / "experiment" / "demo_methods.yaml"),
        )
    )
    assert demo["method.placeholder_token"] == "<sks>"  # textual inversion's option, set on method=full


@pytest.mark.parametrize("path", conf_files(), ids=lambda p: str(p.relative_to(CONF_DIR)))
def test_no_yaml_value_restates_the_schema_default(path):
    restated = restated_defaults(path)
    assert not restated, "\n".join(
        ["Drop these lines (keep a comment saying the default, e.g. '# key: value (schema default) ...'):"]
        + restated
    )
