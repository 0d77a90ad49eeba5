"""``python -m sdsweep.submit --tasks N [sbatch options] -- <sweep overrides>``: the study as a SLURM array.

Submits scripts/slurm/sdsweep_array.sbatch (the script plain `sbatch` runs) with ``--array=0-(N-1)``,
after sizing the array from the plan; see sdsweep/sweep/submit.py.
"""

from __future__ import annotations

import sys

USAGE = (
    "usage: python -m sdsweep.submit --tasks N [sbatch options] -- <sweep overrides>\n"
    "  e.g. python -m sdsweep.submit --tasks 4 --gpus-per-task=1 --time=4:00:00 -- "
    "study=dog +sweep=lr_steps model=sd15\n"
    "  needs SDSWEEP_STORAGE (shared storage) and, on many nodes, SDSWEEP_ROOT on a shared filesystem"
)


def parse(argv: list[str]) -> tuple[int, list[str], list[str]]:
    if "--" not in argv:
        raise SystemExit(f"no `--` before the sweep overrides\n{USAGE}")
    split = argv.index("--")
    head, overrides = argv[:split], argv[split + 1 :]
    tasks, options, i = None, [], 0
    while i < len(head):
        arg = head[i]
        if arg == "--tasks" and i + 1 < len(head):
            tasks, i = head[i + 1], i + 2
            continue
        if arg.startswith("--tasks="):
            tasks = arg.split("=", 1)[1]
        elif arg.startswith("--array"):
            raise SystemExit(f"{arg}: give --tasks N instead (the array is 0..N-1)\n{USAGE}")
        else:
            options.append(arg)
        i += 1
    if tasks is None or not str(tasks).isdigit():
        raise SystemExit(f"--tasks N is required (N a whole number, got {tasks!r})\n{USAGE}")
    return int(tasks), options, overrides


def main(argv: list[str] | None = None) -> int:
    from sdsweep.errors import ConfigError
    from sdsweep.sweep.submit import submit

    argv = sys.argv[1:] if argv is None else argv
    if argv in (["-h"], ["--help"]):
        print(USAGE)
        return 0
    tasks, options, overrides = parse(argv)
    try:
        return submit(tasks, options, overrides)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
