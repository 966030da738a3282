"""`python -m inference.generate ...`: the generation CLI (implemented in `inference.cli`).

Library code imports `inference.cli` or `inference.engine`, never this module: importing it would
rebind the package attribute `inference.generate` (the function) to this module.
"""

import os
import signal
import sys


def _exit_on_ctrl_c(*_) -> None:
    """SIGINT: flush what was printed, one line, exit 130. Raising KeyboardInterrupt instead is not
    reliable: raised inside a JAX callback (its GC hook, its C extension while importing) it is
    swallowed or becomes an ImportError traceback. Generation has nothing to save, so exit at once."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os.write(2, b"\ninterrupted\n")
    os._exit(130)


if __name__ == "__main__":
    signal.signal(signal.SIGINT, _exit_on_ctrl_c)  # before JAX loads (seconds), and for the whole run
    from inference.cli import main

    sys.exit(main())
else:
    from inference.cli import main  # noqa: F401
