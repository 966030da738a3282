"""`python -m inference.generate ...`: the generation CLI (implemented in `inference.cli`).

Library code imports `inference.cli` or `inference.engine`, never this module: importing it would
rebind the package attribute `inference.generate` (the function) to this module.
"""

import sys

from inference.cli import main

if __name__ == "__main__":
    sys.exit(main())
