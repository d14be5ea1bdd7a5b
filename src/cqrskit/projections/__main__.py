"""``python -m cqrskit.projections``: the same as ``cqrskit projections`` (see
:mod:`cqrskit.cli.projections`)."""

import sys

from cqrskit.cli.projections import main

if __name__ == "__main__":
    sys.exit(main())
