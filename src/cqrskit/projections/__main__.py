"""``python -m cqrskit.projections``: see :mod:`cqrskit.projections.cli`."""

import sys

from cqrskit.projections.cli import main

if __name__ == "__main__":
    sys.exit(main())
