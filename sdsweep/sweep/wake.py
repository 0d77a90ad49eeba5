"""Wake-ups between the processes of one study folder on one machine: a file touched when a run ends.

Idle workers wait on its modification time, so a worker waiting for its peer's last run exits with it, not
seconds later. A stat every 0.1 s costs nothing; re-reading the study that often would. Only a hint: a
waiting process re-reads the study on its own within seconds.
"""

from __future__ import annotations

import time
from pathlib import Path

WAKE_FILE = ".wake"  # under runs/


def _stamp(path: Path) -> int | None:
    try:
        return path.stat().st_mtime_ns
    except OSError:
        return None


class WakeFile:
    def __init__(self, runs_dir: Path):
        self.path = runs_dir / WAKE_FILE

    def wait(self, seconds: float) -> None:
        """Sleep up to ``seconds``, returning early when another process touches the file."""
        before = _stamp(self.path)
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            time.sleep(0.1)
            if _stamp(self.path) != before:
                return

    def touch(self) -> None:
        """Tell processes waiting in ``wait`` that the study changed."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.touch()
        except OSError:
            pass  # only a hint
