"""``python -m lowrank_merge``: the ``lowrank-merge`` command line."""

import sys

from .cli import main

sys.exit(main())
