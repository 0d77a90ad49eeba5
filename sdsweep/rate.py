"""``python -m sdsweep.rate``: serve the blind human-rating page (the code lives in ``sdsweep.evaluation.rate``).

A stable command name for users and the Makefile, kept at the top of the package while the layers below move.
"""

import sys

from sdsweep.evaluation.rate import main

if __name__ == "__main__":
    sys.exit(main())
