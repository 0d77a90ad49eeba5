"""The config a run trains with: composed from conf/ and the overrides, fixed up once, memoised per process.

Every process that needs a run's config (the driver's preflight and engine, each worker, each extra
rank of a data-parallel run) gets it from ``compose_config``, so the fix-ups Hydra cannot express are
applied in one place (``fix_up``) and every process sees the same config.
"""

from __future__ import annotations

import copy

from sdsweep.config.methods import method_spec
from sdsweep.config.schema import Config
from sdsweep.study.store import single_run_sweep

# Per-process memo of composed configs: the driver composes the same overrides for the preflight and again
# for the sweep (Hydra takes ~0.5 s each on 2 cores, before any worker can start), a worker for its engine
# and each baseline. Keyed by the overrides and the conf files' stamps, so an edited conf/ is composed
# afresh; callers get a deep copy (a Config is mutable).
_COMPOSED: dict[tuple, Config] = {}
_MEMO_LIMIT = 64


def _conf_stamp() -> tuple:
    from sdsweep.config.compose import CONF_DIR

    return tuple((str(f), f.stat().st_mtime_ns, f.stat().st_size) for f in sorted(CONF_DIR.rglob("*.yaml")))


def compose_config(overrides: list[str]) -> Config:
    """The fixed-up config for these overrides; a private copy the caller may edit."""
    from sdsweep.config.compose import compose_typed

    key = (tuple(overrides), _conf_stamp())
    if key not in _COMPOSED:
        if len(_COMPOSED) > _MEMO_LIMIT:
            _COMPOSED.clear()
        _COMPOSED[key] = fix_up(compose_typed(overrides))
    return copy.deepcopy(_COMPOSED[key])


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
