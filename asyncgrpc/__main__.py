"""``python -m asyncgrpc serve MODULE:ATTR ...``: see :mod:`asyncgrpc.cli`."""
import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
