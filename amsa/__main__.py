"""``python -m amsa <command>``: the command line of :mod:`amsa.cli`."""

import sys

from amsa.cli import main

sys.exit(main())
