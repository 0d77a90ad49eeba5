"""``python -m sdsweep [+sweep=<name>] [overrides...]``: the Hydra entry point, nothing else."""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

from sdsweep.config import register_configs

register_configs()


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def _hydra_main(raw: DictConfig) -> None:
    from sdsweep.cli import run_from_config

    code = run_from_config(raw)
    if code:
        sys.exit(code)


def main() -> None:
    from sdsweep.compose import override_mistake

    mistake = override_mistake(sys.argv[1:])  # before Hydra prints a traceback for it
    if mistake:
        print(f"sdsweep: error: {mistake}", file=sys.stderr)
        sys.exit(2)
    _hydra_main()


if __name__ == "__main__":
    main()
