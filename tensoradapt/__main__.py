"""``python -m tensoradapt``: the command line (see :mod:`tensoradapt.cli`)."""

from .cli import main

if __name__ == "__main__":
    raise SystemExit(main())
