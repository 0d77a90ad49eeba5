"""``python -m sdsweep.generate``: generate images with a study's trial (the code lives in ``sdsweep.results.generate``).

A stable command name for users and the Makefile, kept at the top of the package while the layers below move.
"""

import sys

from sdsweep.results.generate import main

if __name__ == "__main__":
    sys.exit(main())
