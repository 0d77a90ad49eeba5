"""Test plumbing stays out of production paths (#26 item 9): faults in one module, constants defined once."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from sdsweep import exits, faults

PACKAGE = Path(__file__).resolve().parents[1] / "sdsweep"
SOURCES = {path: path.read_text() for path in PACKAGE.rglob("*.py")}


def defined_in(pattern: str) -> list[str]:
    return sorted(
        str(p.relative_to(PACKAGE)) for p, text in SOURCES.items() if re.search(pattern, text, re.M)
    )


def test_only_the_faults_module_reads_the_test_switches():
    for variable in (faults.FAULT, faults.HOST, faults.CLOCK_OFFSET):
        assert defined_in(re.escape(variable)) == ["faults.py"], variable


def test_exit_codes_and_the_error_line_are_defined_once():
    assert defined_in(r"^BASELINE_FAILED\s*=") == ["exits.py"]
    assert defined_in(r"^STUDY_CHANGED\s*=") == ["exits.py"]
    assert defined_in(r"re\.compile\(r\"\^\(\[A-Za-z_\]") == ["exits.py"]
    for line in ("RuntimeError: boom", "torch.OutOfMemoryError: CUDA", "SystemExit: 2", "Killed"):
        assert exits.ERROR_LINE.match(line), line
    assert not exits.ERROR_LINE.match("[sdsweep] trial 0 failed: RuntimeError")


def test_faults_are_off_unless_switched_on(monkeypatch):
    for variable in (faults.FAULT, faults.HOST, faults.CLOCK_OFFSET):
        monkeypatch.delenv(variable, raising=False)
    assert (
        not faults.fault("after_record") and faults.host_override() is None and faults.clock_offset() == 0.0
    )
    faults.kill_at("after_record")  # a no-op: we are still here
    monkeypatch.setenv(faults.FAULT, "rank_crash")
    monkeypatch.setenv(faults.CLOCK_OFFSET, "-100")
    assert faults.fault("rank_crash") and not faults.fault("after_record") and faults.clock_offset() == -100.0


@pytest.mark.parametrize("group", ["method"])
def test_no_internal_schema_is_a_choice_of_a_config_group(group):
    from hydra.core.config_store import ConfigStore

    from sdsweep.config.schema import register_configs

    register_configs()
    entries = ConfigStore.instance().repo.get(group, {})
    assert not [name for name in entries if "schema" in name], entries
