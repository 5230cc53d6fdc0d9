"""``python -m swinv2.cli``: the command line, as ``python -m swinv2``."""

import sys

from . import main

sys.exit(main())
