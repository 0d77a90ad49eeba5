"""Compose a typed config from ``conf/`` and a list of overrides, inside or outside ``@hydra.main``.

Trials are rebuilt from the command line's overrides plus the trial's parameters, so a swept group
(``model=sd21``) brings all of that group's settings, exactly as if typed on the command line.
"""

from __future__ import annotations

from pathlib import Path

from sdsweep.config import Config, register_configs, to_typed


def find_conf_dir() -> Path:
    """The config tree: ``sdsweep/conf`` in an installed wheel, else ``conf/`` at the repository root."""
    here = Path(__file__).resolve().parent
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
    if GlobalHydra.instance().is_initialized():
        return compose(config_name="config", overrides=overrides)
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


def compose_typed(overrides: list[str]) -> Config:
    return to_typed(compose_raw(overrides))
