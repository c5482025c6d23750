"""Sparse inverse covariance estimation by projected gradient, as iSICE computes it.

Rahman, Koniusz, Harandi, Wang, Li et al., "Learning Partial Correlation based Deep Visual
Representation for Image Classification", CVPR 2023 (code: csiro-robotics/iSICE).

For a trace-normalised covariance C (B, d, d), iSICE approximately solves

    min_P  tr(C P) − log det P + λ‖P‖₁

on the split P = P⁺ − P⁻ with P⁺, P⁻ ≥ 0: start from P = C⁻¹ and take ``steps`` projected gradient
steps with the gradient G = C − P⁻¹ and a step η·(1 − i/(n−1)) that decays linearly to 0 (the last
step is a no-op, as in the official code). Every inverse is
:func:`finegrained.ops.newton_schulz.inv_newton_schulz` with 7 iterations, and autograd
differentiates through all of it, as the official code does.

Shapes: (B, d, d) -> (B, d, d).
"""
from __future__ import annotations

import torch
from torch import Tensor

from finegrained.ops.covariance import check_square, sym
from finegrained.ops.newton_schulz import inv_newton_schulz
from finegrained.ops.precision import full_precision

# The official code adds 1e-10 to every entry and a fresh U(0,1)·1e-9 to the diagonal on each call; a fixed
# ridge of the same size is numerically the same, deterministic, and exports.
RIDGE = 1e-9


@full_precision
def sparse_inverse_covariance(c: Tensor, sparsity: float = 0.01, step_size: float = 1.0, steps: int = 5,
                              inverse_iterations: int = 7) -> Tensor:
    """iSICE's sparse precision matrix of the trace-normalised covariance ``c``.

    Args:
        c: (B, d, d) symmetric positive semi-definite, trace 1 (Σ / tr Σ).
        sparsity: λ, the ℓ1 weight (0.01).
        step_size: η (1.0, the value of the authors' script "used in the paper").
        steps: n ≥ 2 projected-gradient steps (5); the step factor is 1 − i/(n − 1).
        inverse_iterations: Newton–Schulz iterations of each inverse (7).
    Returns:
        (B, d, d) symmetric P.
    """
    check_square(c)
    if steps < 2:
        raise ValueError(f"steps must be >= 2 (the step size decays to 0 over them), got {steps}")
    c = sym(c)
    ridge = RIDGE * torch.eye(c.shape[-1], dtype=c.dtype, device=c.device)
    p = inv_newton_schulz(c + ridge, inverse_iterations)
    for i in range(steps):
        factor = step_size * (1.0 - i / (steps - 1))
        positive, negative = torch.relu(p), torch.relu(-p)
        grad = c - inv_newton_schulz(p + ridge, inverse_iterations)
        positive = torch.relu(positive - factor * (grad + sparsity))
        negative = torch.relu(negative - factor * (sparsity - grad))
        p = sym(positive - negative)
    return p
