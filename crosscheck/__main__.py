"""``python -m crosscheck``: the same as the ``crosscheck`` console script."""

import sys

from crosscheck.cli import main

sys.exit(main())
