"""``python -m sdsweep.app``: open the gradio app over a study (the code lives in ``sdsweep.results.app``).

A stable command name for users and the Makefile, kept at the top of the package while the layers below move.
"""

import sys

from sdsweep.results.app import main

if __name__ == "__main__":
    sys.exit(main())
