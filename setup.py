"""Only the package layout that pyproject.toml cannot express; everything else is in pyproject.toml.

``conf/`` stays at the repository root (where Hydra users expect it) and ships inside the wheel as
the ``sdsweep.conf`` package, so the installed ``sdsweep`` command finds its configs from any folder.
"""

from pathlib import Path

from setuptools import find_packages, setup

CONF = Path(__file__).resolve().parent / "conf"
# Every folder of conf/ is a config group: a data package of YAML files inside sdsweep.conf.
conf_packages = ["sdsweep.conf"] + sorted(
    "sdsweep.conf." + ".".join(d.relative_to(CONF).parts) for d in CONF.rglob("*") if d.is_dir()
)

setup(
    packages=find_packages(include=["sdsweep", "sdsweep.*"]) + conf_packages,
    package_dir={"sdsweep.conf": "conf"},
    package_data={name: ["*.yaml"] for name in conf_packages},
)
