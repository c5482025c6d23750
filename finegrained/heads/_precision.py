"""Keep the matrix part of a head out of half precision.

The method form of :func:`finegrained.linalg.full_precision`: under autocast a head's matrix
part runs in float32 while the convolutions before it stay in low precision.
"""
import functools

from finegrained.linalg import full_precision


def float32_matrices(fn):
    """Decorate ``fn(self, x, ...)`` so that ``x`` is float32 (or float64) and autocast is off inside."""

    @functools.wraps(fn)
    def wrapper(self, x, *args, **kwargs):
        return full_precision(lambda t: fn(self, t, *args, **kwargs))(x)

    return wrapper
