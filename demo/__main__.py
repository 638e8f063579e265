"""``python -m tensoradapt.demo``: the same as ``tensoradapt demo``."""

import sys

from .cli import main

sys.exit(main())
