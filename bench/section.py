"""Running one section: a section that fails is recorded with its error, and the others still run."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any


def run_section(name: str, fn: Callable[[], dict[str, Any]], log: Callable[[str], None]) -> dict[str, Any]:
    """The section's results, or ``{"error": ...}``; either way with ``section_seconds``."""
    log(f"section {name}")
    started = time.perf_counter()
    try:
        result = fn()
    except Exception as error:  # the bench reports a broken section instead of losing every number
        result = {"error": f"{type(error).__name__}: {error}"}
        log(f"section {name} failed: {result['error']}")
    result["section_seconds"] = time.perf_counter() - started
    return result
