"""``python -m finegrained.cli``: the same as the ``finegrained`` command."""
import sys

from finegrained.cli import main

sys.exit(main())
