"""A trial's tags (#26 item 4): one typed record in Optuna's user attributes, with the fate as data.

Fast: a real SQLite study, no model."""

from __future__ import annotations

import re
from pathlib import Path

import optuna
import pytest
from conftest import TINY_OVERRIDES, compose
from optuna.distributions import FloatDistribution
from optuna.trial import TrialState, create_trial

from sdsweep.errors import ConfigError
from sdsweep.study.store import StudyHandle, TrialLink
from sdsweep.study.trial_tags import Fate, TrialTags, ending, fate_of_error
from sdsweep.sweep.claims import Claims
from sdsweep.sweep.ledger import StudyLedger

PACKAGE = Path(__file__).resolve().parents[1] / "sdsweep"


@pytest.fixture
def study(tmp_path):
    cfg = compose(TINY_OVERRIDES + ["+sweep=tpe", "sweep.stop_after_failures=2", f"paths.root={tmp_path}"])
    handle = StudyHandle(cfg, f"sqlite:///{tmp_path / 'tags.db'}", "tags")
    claims = Claims(handle, cfg.sweep, "host driver [tok1]", "tok1")
    return handle, claims, StudyLedger(handle, cfg.sweep, claims, retry_below=0)


def ticket(claims: Claims, lr: float) -> int:
    point = f'{{"method.learning_rate": {lr}}}'
    tags = TrialTags(grid_point=point, run_key=point, ticket=True)
    return claims.create_ticket({"lr": lr}, {"lr": FloatDistribution(1e-6, 1.0, log=True)}, tags)


def legacy(**attrs) -> optuna.trial.FrozenTrial:
    return create_trial(state=TrialState.FAIL, user_attrs=attrs)


def test_tags_round_trip_and_writes_keep_the_older_flags():
    tags = TrialTags(
        owner="h worker 0 [abc.0.1]", token="abc.0.1", host="h", heartbeat=12.5, grid_point="{}",
        run_key="r", ticket=True, retry_of=3, fate=Fate.TAKEN_OVER, superseded=True,
        fail_reason="interrupted: ...", trial_dir="trials/0004", wandb_run_id="w1",
    )  # fmt: skip
    frozen = create_trial(state=TrialState.FAIL, user_attrs=tags.attrs())
    assert TrialTags.of(frozen) == tags
    attrs = tags.attrs()
    assert attrs["fate"] == "taken_over" and attrs["crashed"] and attrs["interrupted"]  # for older readers
    assert ending(Fate.CLAIM_LOST, "x", superseded=True).attrs() == {
        "fate": "claim_lost", "superseded": True, "fail_reason": "x", "claim_lost": True,
    }  # fmt: skip
    assert len(ending(Fate.ERROR, "y" * 5000).attrs()["fail_reason"]) == 2000


def test_a_study_written_before_the_fate_attribute_still_reads():
    assert TrialTags.of(legacy(claim_lost=True, superseded=True)).fate is Fate.CLAIM_LOST
    assert TrialTags.of(legacy(handed_back=True)).fate is Fate.HANDED_BACK
    taken = legacy(crashed=True, fail_reason="interrupted: x sent no heartbeat for over 60s (killed?)")
    assert TrialTags.of(taken).fate is Fate.TAKEN_OVER
    assert TrialTags.of(legacy(crashed=True, fail_reason="worker 0 killed by SIGKILL")).fate is Fate.CRASHED
    config = TrialTags.of(legacy(fail_reason="ModelUnavailableError: no such folder"))
    assert config.fate is Fate.CONFIG_ERROR and config.error_type == "ModelUnavailableError"
    assert TrialTags.of(legacy(fail_reason="training diverged: NaN")).fate is Fate.DIVERGED
    assert TrialTags.of(legacy(fail_reason="out of memory: lower ...")).fate is Fate.OUT_OF_MEMORY
    assert TrialTags.of(legacy(fail_reason="KeyError: 'x'")).fate is Fate.ERROR
    assert TrialTags.of(legacy(owner="host worker 1 [abc.1.2]")).token == "abc.1.2"
    assert TrialTags.of(create_trial(state=TrialState.COMPLETE, value=1.0)).fate is None


def test_an_errors_fate_is_read_from_its_class_not_its_message():
    class Subclassed(ConfigError):
        pass

    assert fate_of_error(ConfigError("RuntimeError: looks like another")) is Fate.CONFIG_ERROR
    assert fate_of_error(Subclassed("x")) is Fate.CONFIG_ERROR
    assert fate_of_error(RuntimeError("ConfigError: looks like one")) is Fate.ERROR


def test_claims_and_the_ledger_read_fates_from_the_storage(study):
    handle, claims, ledger = study
    lost, handed, crashed, running = (ticket(claims, lr) for lr in (1e-4, 2e-4, 3e-4, 4e-4))
    claims.lose(lost)
    claims.hand_back([handed], "SIGTERM received")
    claims.crashed(handle.get_trial(crashed), "worker 0 killed by SIGKILL")
    fates = {n: TrialTags.of(handle.get_trial(n)).fate for n in (lost, handed, crashed)}
    assert fates == {lost: Fate.CLAIM_LOST, handed: Fate.HANDED_BACK, crashed: Fate.CRASHED}
    assert "another worker claimed this run first" in str(handle.get_trial(lost).user_attrs["fail_reason"])
    assert {t.number for t in claims.running_of_token("tok1")} == {running}
    assert claims.running_of_token("tok") == []  # ownership is the whole token, not a substring
    # The interrupted configurations are due again; the lost claim is not (nothing ran).
    assert [t.number for t in ledger.interrupted_points()] == [handed, crashed]
    assert ledger.config_failure() is None


@pytest.mark.parametrize("second", ["ConfigError", "DataError", "legacy"])
def test_the_sweep_stops_on_configuration_errors_of_one_kind_only(study, second):
    handle, claims, ledger = study
    claims.hand_back([ticket(claims, 5e-4)], "SIGTERM received")  # not a result: does not count
    first, other = ticket(claims, 1e-4), ticket(claims, 2e-4)
    TrialLink(handle, first).fail("ConfigError: method.rank must be > 0", Fate.CONFIG_ERROR, "ConfigError")
    if second == "legacy":  # written by an older sdsweep: the reason only
        handle.set_attr(other, "fail_reason", "ConfigError: method.rank must be > 0")
        handle.study.tell(other, state=TrialState.FAIL)
    else:
        TrialLink(handle, other).fail(f"{second}: x", Fate.CONFIG_ERROR, second)
    stops = ledger.config_failure()
    if second == "DataError":  # two kinds: not one setting that every trial trips over
        assert stops is None
    else:
        assert stops == "ConfigError: method.rank must be > 0"


def test_no_module_but_trial_tags_reads_a_trial_attribute_by_its_literal_name():
    literal = re.compile(r"user_attrs(\.get\(|\[)\s*['\"]|set_user_attr\(\s*['\"]|startswith\(\"superseded")
    offenders = [
        f"{path.relative_to(PACKAGE)}:{n}"
        for path in PACKAGE.rglob("*.py")
        if path.name != "trial_tags.py"
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if literal.search(line)
    ]
    assert not offenders, offenders
