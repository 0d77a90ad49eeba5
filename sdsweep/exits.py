"""What sdsweep's processes tell each other when they end: exit codes and the error line of a log.

A leaf module (it imports nothing), so a worker or a rank can import it without paying for the pool's
or the trainer's imports.
"""

from __future__ import annotations

import re

# A pool worker's exit codes (sdsweep/sweep/worker.py -> sdsweep/sweep/pool.py).
BASELINE_FAILED = 3  # the baseline evaluation failed: nothing can run
STUDY_CHANGED = 4  # the study's data or settings changed under the sweep: nothing more may run

# The line of a crashed process's output that says what went wrong: an exception's last line
# ("RuntimeError: ...", "torch.OutOfMemoryError: ...", "SystemExit: 2") or the shell's "Killed".
ERROR_LINE = re.compile(r"^([A-Za-z_][\w.]*(Error|Exception|Exit)|Killed)\b.*")
