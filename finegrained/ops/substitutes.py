"""Eigendecomposition-free substitutes for export (ONNX has no eigensolver).

* :func:`powm_newton_schulz` -- (Σ + εI)^α for α = 2^-k by k Newton–Schulz square roots, the
  substitute of :func:`finegrained.ops.eig.eig_power`.
* :func:`logm_newton_schulz` -- log(Σ + εI) by inverse scaling and squaring (Newton–Schulz square
  roots and the Mercator series), the substitute of :func:`finegrained.ops.eig.eig_log`.

Shapes: (B, d, d) symmetric positive semi-definite matrices in and out.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from finegrained.ops.covariance import check_square, sym, unit_frobenius
from finegrained.ops.newton_schulz import newton_schulz
from finegrained.ops.precision import full_precision


def _root_schedule(iterations: int, roots: int):
    """Newton–Schulz iterations for the j-th of successive square roots.

    Each iteration multiplies a small eigenvalue's root estimate by about 1.5 until it converges
    (~5 more iterations). The j-th root starts from a matrix whose condition number is κ^(1/2^j),
    so its growth phase is 2^j times shorter: 5 + ⌈(N − 5)/2^j⌉ iterations.
    """
    return [5 + math.ceil(max(iterations - 5, 0) / 2 ** j) for j in range(roots)]


@full_precision
def powm_newton_schulz(sigma: Tensor, alpha: float = 0.5, eps: float = 0.0, iterations: int = 20) -> Tensor:
    """(Σ + εI)^α for α = 2^-k by k Newton–Schulz square roots; the export substitute of :func:`eig_power`.

    Σ + εI is scaled to unit Frobenius norm, its k-th root taken by k coupled Newton–Schulz square
    roots (``iterations`` for the first, fewer for the better-conditioned later ones), and rescaled.
    """
    check_square(sigma)
    roots, power = 0, 1.0
    while power > alpha and roots < 8:
        power /= 2
        roots += 1
    if power != alpha:
        raise ValueError(f"the Newton–Schulz substitute computes powers 2^-k only (0.5, 0.25, ...), got alpha={alpha}")
    m = sigma + eps * torch.eye(sigma.shape[-1], dtype=sigma.dtype, device=sigma.device) if eps else sigma
    root, norm = unit_frobenius(sym(m))
    for steps in _root_schedule(iterations, roots):
        root = newton_schulz(sym(root), steps)
    return root * norm.pow(alpha)


@full_precision
def logm_newton_schulz(sigma: Tensor, eps: float = 1e-3, roots: int = 6, iterations: int = 22,
                       terms: int = 12) -> Tensor:
    """log(Σ + εI) without an eigendecomposition, by inverse scaling and squaring.

    With c = ‖Σ + εI‖_F and B = (Σ + εI)/c (eigenvalues in (0, 1]):
    log(Σ + εI) = log(c)·I + 2^k · log(B^{1/2^k}). The k square roots use coupled Newton–Schulz
    (``iterations`` for the first, fewer for the better-conditioned later ones), and log(I + X) is its
    Mercator series to ``terms`` terms (after 6 roots of a matrix with κ = 10⁶, ‖X‖ < 0.2).
    Accuracy depends on the spectrum; :func:`finegrained.export` measures and reports it.

    Args:
        sigma: (B, d, d) symmetric positive semi-definite.
    Returns:
        (B, d, d) approximation of log(Σ + εI).
    """
    check_square(sigma)
    if not eps > 0:
        raise ValueError(f"the matrix logarithm needs eps > 0, got {eps}")
    eye = torch.eye(sigma.shape[-1], dtype=sigma.dtype, device=sigma.device)
    root, scale = unit_frobenius(sym(sigma + eps * eye))
    for steps in _root_schedule(iterations, roots):
        root = newton_schulz(sym(root), steps)
    x = root - eye
    power, series = x, x.clone()
    for j in range(2, terms + 1):
        power = power @ x
        series = series + ((-1) ** (j + 1) / j) * power
    return (2 ** roots) * series + torch.log(scale) * eye
