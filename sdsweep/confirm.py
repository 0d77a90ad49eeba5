"""``python -m sdsweep.confirm <study_dir>``: race the contenders of a finished study with fresh shared units.

A stable command name, like ``python -m sdsweep.report``; the logic lives in ``sdsweep.sweep.confirm``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    from sdsweep.results.study_folder import StudyFolderError
    from sdsweep.sweep.confirm import Options, confirm

    parser = argparse.ArgumentParser(
        description="Re-evaluate the trials the verdict cannot tell apart (the best, its ties, the trials "
        "uncertain on a constraint) with fresh, shared seeds, round by round, until the best is separated "
        "or the image budget is spent. Several processes may run it at once; re-running resumes."
    )
    parser.add_argument("study_dir", type=Path, help="experiments/<study>")
    parser.add_argument(
        "--budget", type=int, default=None, help="images per trial (default: 4x the study's own)"
    )
    parser.add_argument(
        "--per-round",
        type=int,
        default=None,
        help="images per prompt each round (default: eval.num_images_per_prompt)",
    )
    parser.add_argument("--max-rounds", type=int, default=None, help="stop after this many rounds")
    parser.add_argument(
        "--grace", type=float, default=60.0, help="seconds before a silent claim is taken over"
    )
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    args = parser.parse_args(argv)
    for name in ("budget", "per_round", "max_rounds"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1, got {value}")
    if args.grace <= 0:
        parser.error(f"--grace must be positive, got {args.grace}")
    options = Options(args.study_dir, args.budget, args.per_round, args.max_rounds, args.grace, args.device)
    try:
        return confirm(options)
    except StudyFolderError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
