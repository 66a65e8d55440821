"""``python -m raypeft ...``: the same command line as ``raypeft ...``."""

import sys

from raypeft.cli import main

sys.exit(main())
