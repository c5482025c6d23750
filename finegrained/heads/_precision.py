"""Keep matrix functions out of half precision.

Covariance, Newton–Schulz and eigendecompositions lose their meaning in fp16/bf16
(trace normalisation and square roots underflow), so under autocast the heads run
their matrix part in float32 while convolutions before it stay in low precision.
"""
import functools

import torch

_HALF = (torch.float16, torch.bfloat16)


def float32_matrices(fn):
    """Decorate ``fn(self, x, ...)`` so that ``x`` is float32 (or float64) and autocast is off inside."""

    @functools.wraps(fn)
    def wrapper(self, x, *args, **kwargs):
        if x.dtype in _HALF:
            x = x.float()
        if torch.is_autocast_enabled(x.device.type):
            with torch.autocast(device_type=x.device.type, enabled=False):
                return fn(self, x, *args, **kwargs)
        return fn(self, x, *args, **kwargs)

    return wrapper
