"""``python -m tensoradapt.demo.study``: the same as ``tensoradapt study``."""

import sys

from .cli import main

sys.exit(main())
