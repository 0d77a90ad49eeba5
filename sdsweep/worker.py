"""``python -m sdsweep.worker <run.json>``: run one training run in its own process.

Isolation means a segfault, an out-of-memory kill or a leaked CUDA context ends only this process;
the driver then fails whatever trials the worker left RUNNING, with the exit status as the reason,
and GPU memory is returned to the driver's next run.
"""

from __future__ import annotations

import sys
from pathlib import Path

from sdsweep.trial import RunSpec, execute_baseline, execute_run


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 1:
        print("usage: python -m sdsweep.worker <run.json>", file=sys.stderr)
        return 2
    spec = RunSpec.from_json(Path(args[0]).read_text())
    if spec.kind == "baseline":
        execute_baseline(spec)
    else:
        execute_run(spec)
    return 0


if __name__ == "__main__":
    sys.exit(main())
