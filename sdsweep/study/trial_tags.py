"""A trial's tags: what sdsweep records about a trial's life in Optuna's user attributes, as one typed record.

Optuna's ``TrialState`` says whether a trial runs or has finished. The sweep needs more: who runs it
(owner, host, token, heartbeat), which run and grid point it serves, and, for a trial that did not
complete, its ``Fate``: lost a claim race, handed back, crashed, taken over, a configuration error, ...
The fate is its own attribute, an enum value, and the code reads that; the fail reason stays a sentence
for people (results.csv, the report, optuna-dashboard) and is never parsed to learn state.

This module is the only one that knows the attribute names. ``TrialTags.of(frozen)`` reads a trial;
``TrialTags(...).attrs()`` gives the attributes to write. Writers also set the boolean flags older
sdsweep versions wrote (``claim_lost``, ``handed_back``, ``crashed``, ``interrupted``), so an older
worker on a shared study, and a person filtering the dashboard, still see them. A study written before the
fate attribute existed is read through ``_legacy_fate``, the one place that still looks at those flags and
at the reason's wording.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, fields
from enum import Enum
from typing import Any

from optuna.trial import FrozenTrial, TrialState

# The attribute names, once.
OWNER = "owner"  # "<host> <label> [<token>]": who runs the trial, for people
HOST = "host"  # the owner's host: whose clock wrote the heartbeat (sweep/claims.py)
TOKEN = "token"  # the owning process's token: ownership is this value, compared whole
HEARTBEAT = "heartbeat"  # unix time of the owner's last sign of life, by the owner's clock
GRID_POINT = "grid_point"  # canonical JSON of the point's params (plan.point_key)
RUN_KEY = "run_key"
TICKET = "ticket"  # this trial was its run's claim ticket (the run's first point)
RETRY_OF = "retry_of"  # the interrupted search trial whose configuration this trial runs again
FATE = "fate"  # Fate.value: why a trial did not complete
SUPERSEDED = "superseded"  # not a result: a lost claim, or an attempt whose point is planned again
FAIL_REASON = "fail_reason"  # a sentence for people
ERROR_TYPE = "error_type"  # the exception's class name, for an ERROR or CONFIG_ERROR fate
TRIAL_DIR = "trial_dir"  # where the trial's files are (trials/NNNN, relative to the study folder), for optuna-dashboard
WANDB_RUN_ID = "wandb_run_id"
# Results the recorder adds beside the tags (not lifecycle, so not fields of TrialTags).
VIOLATIONS = "constraint_violations"
INTERVALS = "intervals"  # {metric: [lo, hi]}: the 95% intervals of the trial's headline metrics
# Flags older sdsweep versions wrote instead of FATE: still written, read only for old studies.
CLAIM_LOST = "claim_lost"
HANDED_BACK = "handed_back"
CRASHED = "crashed"
INTERRUPTED = "interrupted"

MAX_REASON = 2000

# Exceptions that say the configuration is wrong, not the trial: K of them in a row stop the sweep.
CONFIG_ERRORS = ("ConfigError", "ModelUnavailableError", "DataError", "UserError")


class Fate(str, Enum):
    """Why a trial did not complete. None on a trial that is running or completed."""

    CLAIM_LOST = "claim_lost"  # lost the claim race: nothing ran and nothing failed (bookkeeping)
    HANDED_BACK = (
        "handed_back"  # stopped by Ctrl-C/SIGTERM (or its data changed): planned again, costs no retry
    )
    CRASHED = "crashed"  # its worker process died (the pool saw it exit)
    TAKEN_OVER = "taken_over"  # its heartbeat stopped and another process took it over
    CONFIG_ERROR = "config_error"  # failed on the configuration (missing model, bad data, impossible value)
    DIVERGED = "diverged"  # the loss went NaN or exploded
    OUT_OF_MEMORY = "out_of_memory"
    NO_OBJECTIVE = "no_objective"  # evaluated, but an objective is missing or not finite
    PRUNED = "pruned"
    ERROR = "error"  # any other exception while training or evaluating

    @property
    def died(self) -> bool:
        """The owner died while training it: counts against sweep.max_retries."""
        return self in (Fate.CRASHED, Fate.TAKEN_OVER)

    @property
    def interrupted(self) -> bool:
        """Stopped from outside, not by anything the configuration did: its point is worth trying again."""
        return self.died or self is Fate.HANDED_BACK


def fate_of_error(error: BaseException) -> Fate:
    """A trial's fate from the exception that ended it (by class, never by message)."""
    names = {cls.__name__ for cls in type(error).__mro__}
    return Fate.CONFIG_ERROR if names & set(CONFIG_ERRORS) else Fate.ERROR


@dataclass(frozen=True)
class TrialTags:
    owner: str | None = None
    host: str | None = None
    token: str | None = None
    heartbeat: float | None = None
    grid_point: str | None = None
    run_key: str | None = None
    ticket: bool = False
    retry_of: int | None = None
    fate: Fate | None = None
    superseded: bool = False
    fail_reason: str | None = None
    error_type: str | None = None
    trial_dir: str | None = None
    wandb_run_id: str | None = None

    @classmethod
    def of(cls, frozen: FrozenTrial) -> TrialTags:
        attrs = frozen.user_attrs
        beat = attrs.get(HEARTBEAT)
        fate = attrs.get(FATE)
        reason = attrs.get(FAIL_REASON)
        return cls(
            owner=_str(attrs.get(OWNER)),
            host=_str(attrs.get(HOST)),
            token=_str(attrs.get(TOKEN)) or _legacy_token(attrs.get(OWNER)),
            heartbeat=float(beat) if isinstance(beat, (int, float)) else None,
            grid_point=_str(attrs.get(GRID_POINT)),
            run_key=_str(attrs.get(RUN_KEY)),
            ticket=bool(attrs.get(TICKET)),
            retry_of=attrs.get(RETRY_OF) if isinstance(attrs.get(RETRY_OF), int) else None,
            fate=Fate(fate) if fate in _FATES else _legacy_fate(frozen.state, attrs),
            superseded=bool(attrs.get(SUPERSEDED)),
            fail_reason=None if reason is None else str(reason),
            error_type=_str(attrs.get(ERROR_TYPE)) or _legacy_error_type(reason),
            trial_dir=_str(attrs.get(TRIAL_DIR)),
            wandb_run_id=_str(attrs.get(WANDB_RUN_ID)),
        )

    def attrs(self) -> dict[str, Any]:
        """The user attributes to write: the fields that are set (False and None are left out)."""
        out: dict[str, Any] = {}
        for field in fields(self):
            value = getattr(self, field.name)
            if value is None or value is False:
                continue
            out[_NAMES[field.name]] = value
        if self.fate is not None:
            out[FATE] = self.fate.value
            out.update(_LEGACY_FLAGS.get(self.fate, {}))
        if self.fail_reason is not None:
            out[FAIL_REASON] = self.fail_reason[:MAX_REASON]
        return out


def ending(fate: Fate, reason: str, superseded: bool = False, error_type: str | None = None) -> TrialTags:
    """The tags a trial ends with when it does not complete."""
    return TrialTags(fate=fate, fail_reason=reason, superseded=superseded, error_type=error_type)


_NAMES = {
    "owner": OWNER,
    "host": HOST,
    "token": TOKEN,
    "heartbeat": HEARTBEAT,
    "grid_point": GRID_POINT,
    "run_key": RUN_KEY,
    "ticket": TICKET,
    "retry_of": RETRY_OF,
    "fate": FATE,
    "superseded": SUPERSEDED,
    "fail_reason": FAIL_REASON,
    "error_type": ERROR_TYPE,
    "trial_dir": TRIAL_DIR,
    "wandb_run_id": WANDB_RUN_ID,
}
_FATES = {fate.value for fate in Fate}
_LEGACY_FLAGS: dict[Fate, dict[str, bool]] = {
    Fate.CLAIM_LOST: {CLAIM_LOST: True},
    Fate.HANDED_BACK: {HANDED_BACK: True},
    Fate.CRASHED: {CRASHED: True, INTERRUPTED: True},
    Fate.TAKEN_OVER: {CRASHED: True, INTERRUPTED: True},
}


def _str(value: Any) -> str | None:
    return None if value is None else str(value)


# ---- studies written before the fate attribute: read once, here ------------------------------------------
_LEGACY_OWNER_TOKEN = re.compile(r"\[([^\]]+)\]\s*$")


def _legacy_token(owner: Any) -> str | None:
    """Older owners carried the token only inside the owner text: "<host> <label> [<token>]"."""
    match = _LEGACY_OWNER_TOKEN.search(str(owner)) if owner else None
    return match.group(1) if match else None


def _legacy_error_type(reason: Any) -> str | None:
    head = str(reason or "").split(":", 1)[0]
    return head if re.fullmatch(r"[A-Za-z_]\w*(Error|Exception)", head) else None


def _legacy_fate(state: TrialState, attrs: dict[str, Any]) -> Fate | None:
    """The fate of a trial recorded before FATE existed, from the flags and the wording of that time."""
    if attrs.get(CLAIM_LOST):
        return Fate.CLAIM_LOST
    if attrs.get(HANDED_BACK):
        return Fate.HANDED_BACK
    reason = str(attrs.get(FAIL_REASON) or "")
    if attrs.get(CRASHED):
        return Fate.TAKEN_OVER if reason.startswith("interrupted:") else Fate.CRASHED
    if state == TrialState.PRUNED:
        return Fate.PRUNED
    if state != TrialState.FAIL:
        return None
    if reason.split(":", 1)[0] in CONFIG_ERRORS:
        return Fate.CONFIG_ERROR
    if reason.startswith("training diverged"):
        return Fate.DIVERGED
    if reason.startswith("out of memory"):
        return Fate.OUT_OF_MEMORY
    if reason.startswith("objective "):
        return Fate.NO_OBJECTIVE
    return Fate.ERROR
