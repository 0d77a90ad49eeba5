"""``python -m bench``: the command lives in ``bench.run``."""

import sys

from bench.run import main

# Guarded: the sweep's worker pool starts a fork server, which imports the main module.
if __name__ == "__main__":
    sys.exit(main())
