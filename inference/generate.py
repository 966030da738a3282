"""`python -m inference.generate ...`: the generation CLI (implemented in `inference.cli`).

Library code imports `inference.cli` or `inference.engine`, never this module: importing it would
rebind the package attribute `inference.generate` (the function) to this module.
"""

import os
import signal
import sys

if __name__ == "__main__":
    # Importing JAX takes seconds and a KeyboardInterrupt inside its C extension surfaces as an
    # ImportError traceback (or is swallowed), so until the CLI is loaded Ctrl-C exits at once.
    signal.signal(signal.SIGINT, lambda *_: (sys.stderr.write("\ninterrupted\n"), os._exit(130)))
    from inference.cli import main

    signal.signal(signal.SIGINT, signal.default_int_handler)  # the CLI handles KeyboardInterrupt itself
    sys.exit(main())
else:
    from inference.cli import main  # noqa: F401
