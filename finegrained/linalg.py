"""Deprecated: the matrix functions moved to :mod:`finegrained.ops` (one module per family).

``from finegrained.linalg import X`` keeps working for this release and warns; import from
:mod:`finegrained.ops` instead. This module will be removed in the next release.
"""
import warnings

from finegrained.ops import *  # noqa: F401,F403
from finegrained.ops import __all__  # noqa: F401

warnings.warn("finegrained.linalg is deprecated; import from finegrained.ops", DeprecationWarning, stacklevel=2)
