"""What a sweep process asks of its sampler's claimer: the next run to train, or why there is none.

One claimer per sampler kind, chosen once by the engine: ``grid_claims.GridClaims`` (sweep.sampler=grid)
and ``search.SearchClaims`` (tpe, random, gp, cmaes).
"""

from __future__ import annotations

from typing import Protocol

from sdsweep.study.plan import RunPlan
from sdsweep.sweep.run_spec import TrialSlot

WAIT, AGAIN = "wait", "again"  # a claimer's answers: others hold the rest / lost a race, plan again
Claim = tuple[RunPlan, list[TrialSlot]]  # a claimed run and the trials it serves, RUNNING as ours


class Claimer(Protocol):
    def next_claim(self) -> Claim | str | None:
        """A claimed run; WAIT or AGAIN; None when the study needs nothing more from this process."""
        ...

    def finished(self) -> bool:
        """The study reached its target (every grid point, n_trials, or the search's trial count)."""
        ...

    def ran(self, trials: int) -> None:
        """This process finished a run serving ``trials`` trials (progress)."""
        ...
