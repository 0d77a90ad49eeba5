"""The config a run trains with, built once: composed from conf/ and the overrides, typed, normalised, fixed
up and validated, then never changed.

``build_config`` is the one step that writes a config. The engine calls it when it claims a run and puts
the result, as resolved YAML, into the ``RunSpec``; the run's executor, its baseline and the extra ranks of
a data-parallel run read that YAML back (``config.load.config_from_yaml``) and never compose with Hydra.
The overrides travel beside it only to show and to reproduce the run.
"""

from __future__ import annotations

from sdsweep.config.compose import compose_typed
from sdsweep.config.methods import method_spec
from sdsweep.config.schema import Config, single_run_sweep
from sdsweep.sweep.search_space import available_search_space


def requested_config(overrides: list[str]) -> Config:
    """What the user asked for: composed, typed, normalised and validated (``to_typed``), then fixed up.

    The preflight judges this one, so it can name swept values that are not available here."""
    return fix_up(compose_typed(overrides))


def build_config(overrides: list[str]) -> Config:
    """The config a sweep or a run uses: ``requested_config`` without the unavailable swept values when
    ``sweep.skip_unavailable`` (the preflight named what is left out)."""
    return settle(requested_config(overrides))


def settle(cfg: Config) -> Config:
    """The last build stage: with ``sweep.skip_unavailable``, drop the swept values that are not available."""
    if cfg.sweep is not None and cfg.sweep.skip_unavailable:
        cfg.sweep.params, _ = available_search_space(cfg)
    return cfg


def fix_up(cfg: Config) -> Config:
    """The post-compose fix-ups, in one place: what a run needs that conf/ cannot say by itself.

    - Without +sweep, a single training run is a one-point study, so it lands in the same layout.
    - A method that learns a new token (textual inversion): evaluation prompts must use it instead of the
      trigger word (``MethodSpec.rewrite_prompts``).
    """
    if cfg.sweep is None:
        cfg.sweep = single_run_sweep()
    spec = method_spec(cfg.method.name)
    if spec is not None:
        cfg.eval.prompts = spec.rewrite_prompts(cfg.eval.prompts, cfg.data.trigger_word, cfg.method)
    return cfg
