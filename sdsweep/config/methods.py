"""One config schema per method; ``MethodConfig`` (``cfg.method``) is their union.

Each ``conf/method/<name>.yaml`` sets only the options of its schema, and ``check_method_options``
rejects an option that does not belong to the chosen method (``method=full method.rank=64``) with a
ConfigError naming the option, the method and the methods that have it. The union stays the runtime
type so every layer reads any option (a default where it does not apply) without asking which method
runs. Each method is described once by a ``MethodSpec`` in the registry ``METHOD_SPECS``; the built-in
methods register below, a method defined outside sdsweep registers from a plugin (``load_plugins``).
docs/architecture.md "Adding a method" lists the files a new method takes.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
import sys
from collections.abc import Callable
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
    # Deprecated spelling of train.optimizer=adamw8bit: config.load.normalise translates it (with a note).
    use_8bit_adam: bool = False


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


# How a method's saved weights load, export and convert: a whole pipeline folder (full, DreamBooth), a
# diffusers LoRA file, or a textual-inversion embeddings file. A new method picks one of these.
PIPELINE_FORMAT = "pipeline"
LORA_FORMAT = "lora"
EMBEDDINGS_FORMAT = "textual_inversion"
WEIGHTS_FORMATS = (PIPELINE_FORMAT, LORA_FORMAT, EMBEDDINGS_FORMAT)
PIPELINE_FILE = "model_index.json"
LORA_FILE = "pytorch_lora_weights.safetensors"
EMBEDS_FILE = "learned_embeds.safetensors"


@dataclass(frozen=True)
class MethodSpec:
    """Everything the layers above a method ask about it, without importing torch.

    Nothing outside a method's own module and this schema module compares ``cfg.method.name`` with a
    string: validation, prompt rewriting, the study fingerprint, the memory estimate, model loading,
    export and the model card ask the method's spec (``method_spec(cfg.method.name)``).
    """

    name: str  # cfg.method.name and the conf group entry method=<name>
    schema: type[MethodOptions]  # the method's options (conf/method/<name>.yaml sets only these)
    # "module:Class" of the FineTuneMethod subclass; imported only where a run trains or loads weights.
    trainer: str
    weights_format: str  # one of WEIGHTS_FORMATS: how the saved weights load, export and convert
    weights_file: str  # the file that marks a saved weights folder of this method
    # Whether train.adam_weight_decay applies. Textual inversion must not decay the embedding matrix:
    # decay would shrink the learned vector away from the scale of the other token embeddings.
    decays_weights: bool = True
    # The option holding the new token that calls up the concept (textual inversion's placeholder), or
    # None: the data's trigger word does. Evaluation prompts say this token instead of the trigger word,
    # prior prompts must not name it, the study fingerprint records it and the model card shows it.
    concept_token_option: Optional[str] = None
    # The method trains (part of) the text encoder whatever method.train_text_encoder says.
    always_trains_text_encoder: bool = False
    # A boolean option that doubles every training batch (DreamBooth's class images).
    prior_preservation_option: Optional[str] = None
    # The method the memory advice suggests when this one does not fit (None: none is lighter).
    lighter_method: Optional[str] = None
    card_options: tuple[str, ...] = ()  # method options the model card lists to reproduce a trial
    # Config rules beyond the option types, run by validate and again by the method before it trains.
    check: Optional[Callable[[Any], None]] = None

    def concept_token(self, method: Any) -> Optional[str]:
        return getattr(method, self.concept_token_option) if self.concept_token_option else None

    def trains_text_encoder(self, method: Any) -> bool:
        return self.always_trains_text_encoder or bool(method.train_text_encoder)

    def doubles_batch(self, method: Any) -> bool:
        return bool(self.prior_preservation_option and getattr(method, self.prior_preservation_option))

    def rewrite_prompts(self, prompts: list[str], trigger: Optional[str], method: Any) -> list[str]:
        """Prompts that say the method's concept token where they said the data's trigger word."""
        token = self.concept_token(method)
        if not token or not trigger or trigger == token:
            return list(prompts)
        return [" ".join(token if word == trigger else word for word in p.split()) for p in prompts]

    def trainer_class(self) -> type:
        module, _, name = self.trainer.partition(":")
        return getattr(importlib.import_module(module), name)


def check_dreambooth_prompts(cfg: Any) -> None:
    """The one DreamBooth rule set: ``validate`` runs it, and so does the method before it trains."""

    def fail(key: str, value: Any, fix: str) -> None:
        raise ConfigError(f"Invalid config value {key}={value!r}: {fix}")

    method = cfg.method
    if not cfg.data.instance_prompt:
        fail(
            "data.instance_prompt",
            None,
            "DreamBooth needs the one prompt every instance image is trained with; it should contain a "
            "rare identifier bound to the subject, e.g. data.instance_prompt='a photo of sks dog'.",
        )
    if not method.with_prior_preservation:
        return
    if not method.class_prompt:
        fail(
            "method.class_prompt",
            None,
            "prior preservation needs a class prompt for the subject's class without the identifier, "
            "e.g. method.class_prompt='a photo of a dog' (or set method.with_prior_preservation=false).",
        )
    if method.num_class_images < 1:
        fail(
            "method.num_class_images",
            method.num_class_images,
            "prior preservation needs class images; use 50-200 (or set method.with_prior_preservation=false).",
        )
    if cfg.train.bucketing:
        fail(
            "train.bucketing",
            True,
            "DreamBooth prior preservation trains square class images in the same batch; set "
            "method.with_prior_preservation=false or train.bucketing=false.",
        )


_TRAINERS = "sdsweep.training.methods"
METHOD_SPECS: dict[str, MethodSpec] = {}  # name -> spec, in registration order (built-ins first)
METHOD_SCHEMAS: dict[str, type[MethodOptions]] = {}


@dataclass
class MethodConfig(FullOptions, DreamBoothOptions, TextualInversionOptions, LoraOptions):
    """``cfg.method``: the union of the method schemas (each field is defined once, in its schema).

    A method registered later (a plugin) with options of its own grows the union: ``register_method``
    derives a new ``MethodConfig`` from this one and its schema, and ``Config.method`` takes it."""


def register_method(spec: MethodSpec) -> MethodSpec:
    """Make ``method=<spec.name>`` known: its schema joins ``cfg.method`` and every layer asks ``spec``.

    Called by the built-in methods below and by plugins (``load_plugins``); registering a name again
    replaces its spec (a re-imported plugin)."""
    global MethodConfig
    if spec.weights_format not in WEIGHTS_FORMATS:
        raise ConfigError(
            f"Method {spec.name!r} saves weights_format={spec.weights_format!r}; a method's weights load, "
            f"export and convert as one of {list(WEIGHTS_FORMATS)}."
        )
    if not issubclass(spec.schema, MethodOptions):
        raise ConfigError(
            f"Method {spec.name!r}: its schema must subclass sdsweep.config.methods.MethodOptions."
        )
    METHOD_SPECS[spec.name] = spec
    METHOD_SCHEMAS[spec.name] = spec.schema
    if not issubclass(MethodConfig, spec.schema):
        union = type("MethodConfig", (MethodConfig, spec.schema), {"__doc__": MethodConfig.__doc__})
        union.__module__, union.__qualname__ = __name__, "MethodConfig"
        MethodConfig = dataclass(union)
        schema_module = sys.modules.get("sdsweep.config.schema")
        if schema_module is not None:  # already imported: its Config.method takes the grown union
            schema_module.use_method_config(MethodConfig)
    return spec


for _spec in (
    MethodSpec(
        "full",
        FullOptions,
        f"{_TRAINERS}.full:FullFineTune",
        PIPELINE_FORMAT,
        PIPELINE_FILE,
        lighter_method="lora",
        card_options=("use_ema", "train_text_encoder"),
    ),
    MethodSpec(
        "dreambooth",
        DreamBoothOptions,
        f"{_TRAINERS}.dreambooth:DreamBooth",
        PIPELINE_FORMAT,
        PIPELINE_FILE,
        prior_preservation_option="with_prior_preservation",
        lighter_method="lora",
        card_options=("with_prior_preservation", "prior_loss_weight", "class_prompt", "train_text_encoder"),
        check=check_dreambooth_prompts,
    ),
    MethodSpec(
        "textual_inversion",
        TextualInversionOptions,
        f"{_TRAINERS}.textual_inversion:TextualInversion",
        EMBEDDINGS_FORMAT,
        EMBEDS_FILE,
        decays_weights=False,
        concept_token_option="placeholder_token",
        always_trains_text_encoder=True,
        card_options=("placeholder_token", "initializer_token", "num_vectors", "template"),
    ),
    MethodSpec(
        "lora",
        LoraOptions,
        f"{_TRAINERS}.lora:LoRA",
        LORA_FORMAT,
        LORA_FILE,
        card_options=("rank", "alpha", "target_modules"),
    ),
):
    register_method(_spec)


# ---- plugins: methods defined outside sdsweep ----------------------------------------------------------------------
PLUGINS_ENV = "SDSWEEP_PLUGINS"  # comma-separated modules to import, e.g. SDSWEEP_PLUGINS=my_methods.adapter
ENTRY_POINT_GROUP = "sdsweep.methods"  # installed packages: [project.entry-points."sdsweep.methods"]
_loaded_plugins: set[str] = set()


def load_plugins() -> None:
    """Import the method plugins once per process: the modules named in ``$SDSWEEP_PLUGINS`` and the
    ``sdsweep.methods`` entry points of installed packages. Each calls ``register_method`` (and stores
    its ``method/<name>`` entry in Hydra's ConfigStore) when imported.

    An environment variable rather than a config key: the method must be known before the config is
    composed (its schema and its ``method=`` entry are part of the composition), and every process a
    sweep starts (workers, data-parallel ranks, SLURM tasks, export) inherits it."""
    from importlib.metadata import entry_points

    wanted = [m.strip() for m in os.environ.get(PLUGINS_ENV, "").split(",") if m.strip()]
    for module in wanted:
        if module in _loaded_plugins:
            continue
        _loaded_plugins.add(module)
        try:
            importlib.import_module(module)
        except ImportError as error:
            _loaded_plugins.discard(module)
            raise ConfigError(
                f"{PLUGINS_ENV}={os.environ.get(PLUGINS_ENV)!r}: the plugin module {module!r} does not import "
                f"({error}). Put its folder on PYTHONPATH or install it."
            ) from error
    for entry in entry_points(group=ENTRY_POINT_GROUP):
        if entry.value not in _loaded_plugins:
            _loaded_plugins.add(entry.value)
            entry.load()


def method_spec(name: str) -> Optional[MethodSpec]:
    """The spec of ``method=<name>``, plugins included; None for a name nothing registered."""
    if name not in METHOD_SPECS:
        load_plugins()
    return METHOD_SPECS.get(name)


def method_names() -> list[str]:
    """Every registered method name (the allowed values of ``method.name``)."""
    load_plugins()
    return list(METHOD_SPECS)


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
    "EMBEDDINGS_FORMAT",
    "LORA_FORMAT",
    "METHOD_SCHEMAS",
    "METHOD_SPECS",
    "PIPELINE_FORMAT",
    "PLUGINS_ENV",
    "WEIGHTS_FORMATS",
    "MethodSpec",
    "check_dreambooth_prompts",
    "load_plugins",
    "method_names",
    "method_spec",
    "register_method",
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
