"""``python -m swinv2``: the command line (what torchrun launches: ``torchrun ... -m swinv2 train``)."""

import sys

from .cli import main

sys.exit(main())
