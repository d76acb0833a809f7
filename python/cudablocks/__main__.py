"""``python -m cudablocks``: the command line (see :mod:`cudablocks.cli`)."""

import sys

from cudablocks.cli import main

sys.exit(main())
