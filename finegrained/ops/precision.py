"""Precision rules of the matrix functions: float32 (or float64) inside, autocast off.

Covariances, Newton–Schulz iterations and eigendecompositions lose their meaning in fp16/bf16
(traces and square roots underflow, near-ties round together), so every matrix function runs in
float32 or float64, whatever the precision of the convolutions before it:

* :func:`at_least_float32` -- fp16/bf16 tensors -> float32; float32 and float64 unchanged.
* :func:`full_precision` -- decorator for ``fn(x, ...)``: ``x`` at least float32, autocast off inside.
* :func:`float32_matrices` -- the method form ``fn(self, x, ...)``, used by the heads.
"""
from __future__ import annotations

import functools

import torch
from torch import Tensor


def at_least_float32(t: Tensor) -> Tensor:
    """float16/bfloat16 -> float32; float32 and float64 unchanged."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def full_precision(fn):
    """Run ``fn(x, ...)`` in float32 (or float64) with autocast off.

    Covariances, Newton–Schulz and eigendecompositions lose their meaning in fp16/bf16 (traces and
    square roots underflow), and autocast would also run the matmuls inside custom autograd
    Functions in half precision; so under autocast the matrix functions take float32 inputs.
    """

    @functools.wraps(fn)
    def wrapper(x, *args, **kwargs):
        x = at_least_float32(x)
        if torch.is_autocast_enabled(x.device.type):
            with torch.autocast(device_type=x.device.type, enabled=False):
                return fn(x, *args, **kwargs)
        return fn(x, *args, **kwargs)

    return wrapper


def float32_matrices(fn):
    """Decorate ``fn(self, x, ...)`` so that ``x`` is float32 (or float64) and autocast is off inside."""

    @functools.wraps(fn)
    def wrapper(self, x, *args, **kwargs):
        return full_precision(lambda t: fn(self, t, *args, **kwargs))(x)

    return wrapper
