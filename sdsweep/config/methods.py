"""One config schema per method; ``MethodConfig`` (``cfg.method``) is their union.

Each ``conf/method/<name>.yaml`` sets only the options of its schema, and ``check_method_options``
rejects an option that does not belong to the chosen method (``method=full method.rank=64``) with a
ConfigError naming the option, the method and the methods that have it. The union stays the runtime
type so every layer reads any option (a default where it does not apply) without asking which method
runs. Adding a method: one schema here, one ``methods/`` subclass, one YAML.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Optional

from sdsweep.errors import ConfigError


@dataclass
class MethodOptions:
    """The options every method has."""

    name: str = "full"
    learning_rate: float = 1e-5
    scale_lr: bool = False  # multiply lr by batch size x grad accumulation x train.num_processes
    train_text_encoder: bool = False
    use_8bit_adam: bool = False  # legacy spelling of train.optimizer=adamw8bit; any method


@dataclass
class FullOptions(MethodOptions):
    use_ema: bool = False
    ema_decay: float = 0.9999


@dataclass
class DreamBoothOptions(MethodOptions):
    with_prior_preservation: bool = True
    prior_loss_weight: float = 1.0
    num_class_images: int = 50
    class_prompt: Optional[str] = None


@dataclass
class TextualInversionOptions(MethodOptions):
    placeholder_token: str = "<sks>"
    initializer_token: str = "person"
    num_vectors: int = 1
    template: str = "object"  # object | style | none (use the dataset captions)


@dataclass
class LoraOptions(MethodOptions):
    rank: int = 4
    alpha: float = 4.0
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"])
    text_encoder_rank: int = 4


@dataclass(frozen=True)
class MethodSpec:
    """What the layers above ``methods/`` need to know about a method, without importing torch."""

    schema: type[MethodOptions]
    weights_format: str  # pipeline | lora | textual_inversion: how the saved weights load
    weights_file: str  # the file that marks a saved weights folder of this method
    # Whether train.adam_weight_decay applies. Textual inversion must not decay the embedding matrix:
    # decay would shrink the learned vector away from the scale of the other token embeddings.
    decays_weights: bool = True


PIPELINE_FILE = "model_index.json"
LORA_FILE = "pytorch_lora_weights.safetensors"
EMBEDS_FILE = "learned_embeds.safetensors"
METHOD_SPECS: dict[str, MethodSpec] = {
    "full": MethodSpec(FullOptions, "pipeline", PIPELINE_FILE),
    "dreambooth": MethodSpec(DreamBoothOptions, "pipeline", PIPELINE_FILE),
    "textual_inversion": MethodSpec(TextualInversionOptions, "textual_inversion", EMBEDS_FILE, False),
    "lora": MethodSpec(LoraOptions, "lora", LORA_FILE),
}
METHOD_SCHEMAS: dict[str, type[MethodOptions]] = {name: spec.schema for name, spec in METHOD_SPECS.items()}


@dataclass
class MethodConfig(FullOptions, DreamBoothOptions, TextualInversionOptions, LoraOptions):
    """``cfg.method``: the union of the method schemas (each field is defined once, in its schema)."""


def _defaults(schema: type) -> dict[str, Any]:
    out = {}
    for f in dataclasses.fields(schema):
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            out[f.name] = f.default_factory()
    return out


def option_names(method: str) -> list[str]:
    return [f.name for f in dataclasses.fields(METHOD_SCHEMAS[method])]


def check_method_options(method: Any, swept_methods: list[str] | None = None) -> None:
    """An option set away from its default that the chosen method does not have is a ConfigError.

    Judged by value, so experiment files, sweeps and saved trial configs are checked the same way as
    the command line; an option left at its default changes nothing and passes. A sweep that switches
    ``method`` may set the options of every method it switches to (``swept_methods``).
    """
    if method.name not in METHOD_SCHEMAS:
        return  # an unknown method name is reported by validate's allowed values
    methods = [method.name] + [m for m in swept_methods or [] if m in METHOD_SCHEMAS]
    own = {key for name in methods for key in option_names(name)}
    defaults = _defaults(MethodConfig)
    for key, default in defaults.items():
        value = getattr(method, key)
        if key in own or value == default:
            continue
        owners = [name for name in METHOD_SCHEMAS if key in option_names(name)]
        raise ConfigError(
            f"Invalid config value method.{key}={value!r}: method={method.name} has no option '{key}' "
            f"(it belongs to method={' | '.join(owners)}). Drop it, or choose that method; "
            f"method={'/'.join(methods)} takes {', '.join(sorted(own - {'name'}))}."
        )


def check_method_overrides(
    method_name: str, overrides: list[str], swept_methods: list[str] | None = None
) -> None:
    """A command-line ``method.<option>=...`` that the chosen method does not have is a ConfigError even when
    its value equals the default (``check_method_options`` judges values, so it cannot see those)."""
    if method_name not in METHOD_SCHEMAS:
        return
    methods = [method_name] + [m for m in swept_methods or [] if m in METHOD_SCHEMAS]
    own = {key for name in methods for key in option_names(name)}
    for override in overrides:
        key, _, value = override.lstrip("+~").partition("=")
        if not key.startswith("method.") or key.count(".") != 1:
            continue
        option = key.split(".", 1)[1]
        owners = [name for name in METHOD_SCHEMAS if option in option_names(name)]
        if option in own or not owners:
            continue  # an unknown key altogether is reported by the schema check
        raise ConfigError(
            f"Invalid override {override}: method={method_name} has no option '{option}' (it belongs to "
            f"method={' | '.join(owners)}). Drop it, or choose that method."
        )


__all__ = [
    "METHOD_SCHEMAS",
    "METHOD_SPECS",
    "MethodSpec",
    "DreamBoothOptions",
    "FullOptions",
    "LoraOptions",
    "MethodConfig",
    "MethodOptions",
    "TextualInversionOptions",
    "check_method_options",
    "check_method_overrides",
    "option_names",
]
