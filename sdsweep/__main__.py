"""``sdsweep [+experiment=...] [+sweep=...] [overrides...]``: the Hydra entry point, nothing else.

``--plan`` (alias ``--dry-run``) prints the effective grid and the run plan and exits before any
model loads. ``--help`` shows conf/hydra/help/sdsweep.yaml.
"""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

from sdsweep.config.compose import CONF_DIR
from sdsweep.config.schema import register_configs
from sdsweep.warnings_filter import install as install_warning_filters

register_configs()
install_warning_filters()
PLAN_FLAGS = ("--plan", "--dry-run")
_PLAN_ONLY = False


# An absolute path: the installed console script finds the conf shipped in the wheel from any folder.
@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
def _hydra_main(raw: DictConfig) -> None:
    from sdsweep.cli import print_plan, run_from_config

    code = print_plan(raw) if _PLAN_ONLY else run_from_config(raw)
    if code:
        sys.exit(code)


def main() -> None:
    from sdsweep.config.compose import override_mistake

    mistake = override_mistake(sys.argv[1:])  # before Hydra prints a traceback for it
    if mistake:
        print(f"sdsweep: error: {mistake}", file=sys.stderr)
        sys.exit(2)
    global _PLAN_ONLY
    _PLAN_ONLY = any(arg in PLAN_FLAGS for arg in sys.argv[1:])
    sys.argv = [arg for arg in sys.argv if arg not in PLAN_FLAGS]  # Hydra does not know these flags
    try:
        _hydra_main()
    except KeyboardInterrupt:
        # Ctrl-C outside a sweep's runs (while starting up, or while the closing report is written): no
        # run is held then (runs hand themselves back, sdsweep.signals), and finished trials are recorded.
        print(
            "\nsdsweep: stopped by Ctrl-C; nothing was lost. Re-run the same command to continue.",
            file=sys.stderr,
        )
        sys.exit(130)


if __name__ == "__main__":
    main()
