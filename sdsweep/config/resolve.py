"""Values derived from a ``Config`` without changing it: a dotted key's value, the sweep's parameters
with the command-line shorthands applied, the resolution and guidance rescale in effect, a flat view."""

from __future__ import annotations

from typing import Any

from omegaconf import OmegaConf

from sdsweep.config.schema import Config, ParamSpec, SweepConfig


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
