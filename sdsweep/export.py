"""``python -m sdsweep.export``: export a trial's weights and model card (the code lives in ``sdsweep.results.export``).

A stable command name for users and the Makefile, kept at the top of the package while the layers below move.
"""

import sys

from sdsweep.results.export import main

if __name__ == "__main__":
    sys.exit(main())
