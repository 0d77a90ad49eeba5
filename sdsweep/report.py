"""``python -m sdsweep.report``: write a study's report.md and report.html (the code lives in ``sdsweep.results.report``).

A stable command name for users and the Makefile, kept at the top of the package while the layers below move.
"""

import sys

from sdsweep.results.report import main

if __name__ == "__main__":
    sys.exit(main())
