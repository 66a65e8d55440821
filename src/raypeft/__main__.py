"""``python -m raypeft ...``: the same command line as ``raypeft ...``."""

import sys

try:  # the imports take seconds (torch, ray, mlflow): Ctrl-C there is an interrupt too, not a traceback
    from raypeft.cli import main
except KeyboardInterrupt:
    print("raypeft: interrupted", file=sys.stderr)
    sys.exit(130)

sys.exit(main())
