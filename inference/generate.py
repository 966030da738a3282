"""`python -m inference.generate ...`: the generation CLI (implemented in `inference.cli`).

Library code imports `inference.cli` or `inference.engine`, never this module: importing it would
rebind the package attribute `inference.generate` (the function) to this module.
"""

import sys

if __name__ == "__main__":
    try:  # importing JAX takes seconds: Ctrl-C then must not print a traceback either
        from inference.cli import main
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(main())
else:
    from inference.cli import main  # noqa: F401
