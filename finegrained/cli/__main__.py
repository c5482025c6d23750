"""``python -m finegrained.cli``: the same as the ``finegrained`` command."""
import sys

from finegrained.cli import entry_point

sys.exit(entry_point())
