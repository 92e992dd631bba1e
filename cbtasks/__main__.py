"""``python -m cbtasks``: the operator's command line, as the ``cbtasks`` script."""

import sys

from cbtasks.ops.cli import main

if __name__ == "__main__":
    sys.exit(main())
