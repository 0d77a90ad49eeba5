"""One config schema per method: each conf/method/*.yaml fits its schema, foreign options are rejected."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from sdsweep.config.methods import METHOD_SCHEMAS, MethodConfig, option_names
from sdsweep.errors import ConfigError
from tests.conftest import compose

CONF = Path(__file__).resolve().parents[1] / "conf"


@pytest.mark.parametrize("path", sorted((CONF / "method").glob("*.yaml")), ids=lambda p: p.stem)
def test_each_method_yaml_sets_only_its_schemas_options(path):
    keys = set(yaml.safe_load(path.read_text())) - {"defaults"}
    assert path.stem in METHOD_SCHEMAS
    assert keys <= set(option_names(path.stem)), keys - set(option_names(path.stem))
    cfg = compose([f"method={path.stem}"])
    assert cfg.method.name == path.stem


def test_the_union_defines_every_schema_field_once():
    union = {f.name for f in dataclasses.fields(MethodConfig)}
    assert union == {name for method in METHOD_SCHEMAS for name in option_names(method)}


@pytest.mark.parametrize(
    "overrides, option, owner",
    [
        (["method=full", "method.rank=64"], "rank", "lora"),
        (["method=full", "method.num_class_images=7"], "num_class_images", "dreambooth"),
        (["method=lora", "method.use_ema=true"], "use_ema", "full"),
        (["method=dreambooth", "method.num_vectors=3"], "num_vectors", "textual_inversion"),
    ],
)
def test_an_option_of_another_method_is_rejected_naming_it(overrides, option, owner):
    method = overrides[0].split("=")[1]
    with pytest.raises(
        ConfigError, match=rf"method\.{option}=.*method={method} has no option '{option}'.*{owner}"
    ):
        compose(overrides)


def test_shared_options_and_multi_method_sweeps_pass():
    assert compose(["method=lora", "method.use_8bit_adam=false", "method.rank=8"]).method.rank == 8
    # A sweep that switches methods may set each swept method's options in one place.
    cfg = compose(["+experiment=demo_methods"])
    assert cfg.method.placeholder_token == "<star>" and cfg.method.name == "full"
