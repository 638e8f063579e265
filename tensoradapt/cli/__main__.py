"""``python -m tensoradapt.cli``: the same as the ``tensoradapt`` command."""

from . import main

if __name__ == "__main__":
    raise SystemExit(main())
