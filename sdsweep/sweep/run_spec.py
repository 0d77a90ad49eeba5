"""What one training run is asked to do: the JSON-serialisable record that crosses process boundaries.

The same ``RunSpec`` is executed in-process or by an isolated worker (``python -m sdsweep.sweep.worker``),
so it holds only plain values: the run's config as resolved YAML (built once, when the run was claimed:
``sdsweep.sweep.run_config.build_config``), the overrides it was built from (to show and to reproduce the run,
never composed again), and the trial slots it serves.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

from sdsweep.config.load import config_from_yaml
from sdsweep.config.schema import Config


@dataclass
class TrialSlot:
    """A grid point served by a run: its Optuna trial and the step at which it is evaluated."""

    number: int
    trial_id: int
    step: int
    params: dict[str, Any]


@dataclass
class RunSpec:
    study: str
    study_root: str
    storage: str
    overrides: list[str]  # the Hydra overrides the config was built from: shown and reproduced, not composed
    config: str  # the run's config, resolved YAML (config.load.to_yaml of the built config)
    run_key: str = ""
    slots: list[TrialSlot] = field(default_factory=list)
    shared: bool = False  # one run evaluated at several milestones
    report_every: int = 0  # extra val-loss points for pruning (0: only at milestones)

    def typed_config(self) -> Config:
        """The run's typed config, read back from ``config`` (no Hydra composition)."""
        return config_from_yaml(self.config)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str) -> RunSpec:
        raw = json.loads(text)
        raw["slots"] = [TrialSlot(**s) for s in raw["slots"]]
        return cls(**raw)
