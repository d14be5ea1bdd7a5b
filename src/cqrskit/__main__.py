"""``python -m cqrskit``: the same as the ``cqrskit`` console script."""

import sys

from cqrskit.cli import main

if __name__ == "__main__":
    sys.exit(main())
