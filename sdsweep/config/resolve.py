"""Values derived from a ``Config`` without changing it: a dotted key's value, the sweep's parameters
with the command-line shorthands applied, its own learning-rate ranges, the resolution and guidance rescale
in effect, a flat view."""

from __future__ import annotations

from typing import Any

from omegaconf import OmegaConf

from sdsweep.config.schema import Config, ParamSpec, SweepConfig
from sdsweep.metric_names import LR_KEY


def get_key(cfg: Any, dotted: str) -> Any:
    node = cfg
    for part in dotted.split("."):
        node = node[part] if isinstance(node, dict) else getattr(node, part)
    return node


def sweep_params(sweep: SweepConfig) -> dict[str, ParamSpec]:
    """``sweep.params`` with the ``sweep.learning_rates`` / ``sweep.steps`` shorthands applied (a new dict)."""
    params = dict(sweep.params)
    if sweep.learning_rates is not None:
        params["method.learning_rate"] = ParamSpec(choices=list(sweep.learning_rates))
    if sweep.steps is not None:
        params["train.max_train_steps"] = ParamSpec(choices=list(sweep.steps), type="int")
    if sweep.replicates > 1:  # one training run per seed; milestone sharing still serves every step count
        params[REPLICATE_KEY] = ParamSpec(choices=list(range(sweep.replicates)), type="int")
    return params


REPLICATE_KEY = "train.seed"  # the parameter whose values are replicates of one configuration


def lr_ranges(sweep: SweepConfig) -> dict[str, ParamSpec]:
    """Each learning rate a search draws as its own Optuna parameter, by that parameter's name:
    ``method.learning_rate[lora]`` (sweep.learning_rate_by_method) and ``method.learning_rate[sdxl/lora]``
    (sweep.learning_rate_by_model_method). Separate names keep separate distributions for the sampler; the
    drawn value is recorded as ``method.learning_rate`` either way. Ranges of methods that are not swept are
    left out: nothing draws them."""
    swept = {str(c) for c in (sweep.params.get("method") or ParamSpec()).choices or []}
    by_method = sweep.learning_rate_by_method.items()
    ranges = {f"{LR_KEY}[{method}]": spec for method, spec in by_method if str(method) in swept}
    ranges.update({f"{LR_KEY}[{key}]": spec for key, spec in sweep.learning_rate_by_model_method.items()})
    return ranges


def lr_param_names(point: dict[str, Any]) -> list[str]:
    """The names in ``lr_ranges`` that could hold a drawn point's learning rate, the most specific first:
    its model and method, then its method alone (none when the method is not swept)."""
    model, method = point.get("model"), point.get("method")
    if method is None:
        return []
    return ([f"{LR_KEY}[{model}/{method}]"] if model is not None else []) + [f"{LR_KEY}[{method}]"]


def resolved_resolution(cfg: Config) -> int:
    return cfg.data.resolution or cfg.model.resolution


def resolved_guidance_rescale(cfg: Config) -> float:
    """eval.guidance_rescale, or its default: 0.7 with zero-terminal SNR (Lin et al. 2023), else 0."""
    if cfg.eval.guidance_rescale is not None:
        return cfg.eval.guidance_rescale
    return 0.7 if cfg.train.zero_terminal_snr else 0.0


def flatten(cfg: Config) -> dict[str, Any]:
    """A flat {dotted.key: value} view, for W&B config and result tables."""
    container = OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)
    out: dict[str, Any] = {}

    def walk(prefix: str, node: Any) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)
        else:
            out[prefix] = node

    walk("", container)
    return out
