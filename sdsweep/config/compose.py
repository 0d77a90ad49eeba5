"""Compose a typed config from ``conf/`` and a list of overrides, inside or outside ``@hydra.main``.

Trials are rebuilt from the command line's overrides plus the trial's parameters, so a swept group
(``model=sd21``) brings all of that group's settings, exactly as if typed on the command line.
"""

from __future__ import annotations

from pathlib import Path

from sdsweep.config.load import to_typed
from sdsweep.config.schema import Config, register_configs
from sdsweep.errors import ConfigError

SWEEP_SHORTCUTS = ("sweep.learning_rates", "sweep.steps")


def _selects_sweep(overrides: list[str]) -> bool:
    return any(o.lstrip("+~").startswith(("sweep=", "experiment=")) for o in overrides)


# Hydra's own flags that take a value (``--cfg job``, ``-cn config``); ``--info`` may take one.
_VALUE_FLAGS = {"--cfg", "-c", "--package", "-p", "--config-path", "-cp", "--config-name", "-cn"}
_VALUE_FLAGS |= {"--config-dir", "-cd", "--info", "-i", "--experimental-rerun"}


def _override_args(argv: list[str]) -> list[str]:
    args, skip_next = [], False
    for arg in argv:
        if skip_next and "=" not in arg:
            skip_next = False
            continue
        skip_next = arg in _VALUE_FLAGS
        if not arg.startswith("-"):
            args.append(arg)
    return args


def override_mistake(argv: list[str]) -> str | None:
    """The fix for a command line Hydra would reject with a traceback or a cryptic message, else None.

    Checked before Hydra parses the command line, so the user sees one line that names the argument.
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import OverrideParseException

    overrides = _override_args(argv)

    parser = OverridesParser.create()
    for arg in overrides:
        try:
            parser.parse_overrides([arg])
        except OverrideParseException:
            key, _, value = arg.partition("=")
            if not _ or not key:
                return (
                    f"cannot read the argument {arg!r}: it has no key=value. If it is the rest of a path with "
                    "spaces, quote the whole value, e.g. 'data.path=\"/data/my images (1)\"'."
                )
            return (
                f"cannot read the override {arg!r}: values with spaces, parentheses, commas or brackets must be "
                f"quoted for Hydra inside the shell's quotes, e.g. '{key}=\"{value}\"'."
            )
    used = [o for o in overrides if o.lstrip("+~").split("=", 1)[0] in SWEEP_SHORTCUTS]
    if used and not _selects_sweep(overrides):
        return (
            f"{used[0].split('=', 1)[0]} sets a grid but no sweep is selected; add +sweep=lr_steps, e.g. "
            "python -m sdsweep +sweep=lr_steps sweep.learning_rates=[1e-5,1e-4] sweep.steps=[400,800]."
        )
    if any(o.startswith("+experiment=") for o in overrides):
        extra = [o for o in overrides if o.startswith("+sweep=")]
        if extra:
            return (
                f"a recipe (+experiment=...) already selects a sweep; change it with a plain override: "
                f"{extra[0][1:]} (without the '+')."
            )
    return None


def find_conf_dir() -> Path:
    """The config tree: ``sdsweep/conf`` in an installed wheel, else ``conf/`` at the repository root."""
    here = Path(__file__).resolve().parents[1]  # the sdsweep package (this file is sdsweep/config/compose.py)
    for candidate in (here / "conf", here.parent / "conf"):
        if (candidate / "config.yaml").is_file():
            return candidate
    raise FileNotFoundError(
        f"sdsweep's conf/ was found neither in {here} nor in {here.parent}; reinstall sdsweep."
    )


CONF_DIR = find_conf_dir()


def user_overrides(overrides: list[str]) -> list[str]:
    """Drop Hydra's own settings (hydra.run.dir=..., hydra/launcher=...): they do not shape a trial."""
    return [o for o in overrides if not o.lstrip("+~").startswith("hydra")]


def compose_raw(overrides: list[str]):
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    register_configs()
    overrides = user_overrides(overrides)
    mistake = override_mistake(overrides)
    if mistake:
        raise ConfigError(mistake)
    if GlobalHydra.instance().is_initialized():
        return compose(config_name="config", overrides=overrides)
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


def compose_typed(overrides: list[str]) -> Config:
    return to_typed(compose_raw(overrides))
