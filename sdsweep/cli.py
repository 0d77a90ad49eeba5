"""What ``python -m sdsweep`` does with a composed config: validate, run, and say where results are.

Bad input is reported as one paragraph and exit code 2, before any model is loaded.
"""

from __future__ import annotations

import sys

from omegaconf import DictConfig
from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException

from sdsweep.config import ConfigError, to_typed


class UserError(Exception):
    """Input the user can fix; printed without a traceback."""


def preflight(overrides: list[str]) -> None:
    """Cheap checks that would otherwise fail after minutes of work (sdsweep.preflight)."""
    from sdsweep.preflight import PreflightError, run_preflight

    try:
        run_preflight(overrides)
    except PreflightError as error:
        raise UserError(str(error)) from None


def run_from_config(raw: DictConfig, overrides: list[str] | None = None) -> int:
    from sdsweep.sweep import log, run_sweep

    if overrides is None:
        from hydra.core.hydra_config import HydraConfig

        overrides = list(HydraConfig.get().overrides.task)
    try:
        to_typed(raw)
        preflight(overrides)
    except (ConfigError, UserError) as error:
        print(f"sdsweep: error: {error}", file=sys.stderr)
        return 2
    except MissingMandatoryValue as error:
        key = getattr(error, "full_key", "") or str(error)
        print(
            f"sdsweep: error: the config value {key} is required but not set; add {key}=<value> to the command line.",
            file=sys.stderr,
        )
        return 2
    except OmegaConfBaseException as error:
        print(f"sdsweep: error: invalid configuration: {error}", file=sys.stderr)
        return 2
    outcome = run_sweep(overrides)
    log(f"results: {outcome.results_csv}")
    log(f"study folder: {outcome.study_dir} (per-trial configs, metrics, samples and weights under trials/)")
    states = ", ".join(f"{n} {s.lower()}" for s, n in sorted(outcome.states.items()))
    if states:
        log(f"trials: {states}")
    if outcome.best:
        best = outcome.best
        log(
            f"best trial: {best.get('trial')} (objective {best.get('objective')}) weights: {best.get('weights_dir') or 'removed'}"
        )
    log(f"W&B (offline): wandb sync {outcome.study_dir}/wandb/wandb/offline-run-*")
    return 0
