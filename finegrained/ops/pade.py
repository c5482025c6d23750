"""Matrix square roots by rational (Padé) and Taylor approximants, with the Lyapunov backward.

Song, Sebe, Wang, "Fast Differentiable Matrix Square Root", ICLR 2022 (MPA-Lya and MTP-Lya).

Forward, for a symmetric positive semi-definite A (B, d, d): Â = A/‖A‖_F (eigenvalues in [0, 1]),
R = I − Â, and √Â = √(I − R) by

* MPA (default): the [5/5] Padé approximant of √(1 − z), Q(R)⁻¹P(R), one (Cholesky) linear solve;
* MTP: its degree-10 Taylor polynomial, I − Σ_k |C(½, k)| R^k.

Then √A = √Â · √‖A‖_F. The backward is the authors' (``MPA_Lya.backward``, KingJamesSong/FastDifferentiableMatSqrt,
``torch_utils.py``): it does not differentiate the approximant, the normalisation or the compensation, but
solves the Lyapunov equation √A X + X √A = ∂l/∂√A by 8 coupled Newton–Schulz sign iterations started from √Â
(:func:`finegrained.ops.lyapunov.root_with_lyapunov_backward`) and returns X as ∂l/∂A: the derivative of
the exact square root once the iteration has converged.

Shapes: (B, d, d) -> (B, d, d).
"""
from __future__ import annotations

import functools
from fractions import Fraction
from typing import List

import torch
from torch import Tensor

from finegrained.ops.covariance import check_square
from finegrained.ops.lyapunov import root_with_lyapunov_backward
from finegrained.ops.newton_schulz import inv_newton_schulz
from finegrained.ops.precision import full_precision

METHODS = ("mpa", "mtp")


def sqrt_taylor_coefficients(degree: int = 10) -> List[Fraction]:
    """a_k of √(1 − z) = Σ a_k z^k: a_0 = 1, a_k = a_{k−1}·(k − 3/2)/k (exact fractions)."""
    coefficients = [Fraction(1)]
    for k in range(1, degree + 1):
        coefficients.append(coefficients[-1] * (Fraction(k) - Fraction(3, 2)) / k)
    return coefficients


def pade_coefficients(m: int = 5, n: int = 5):
    """(p, q) of the [m/n] Padé approximant of √(1 − z), q_0 = 1, from its Taylor coefficients:
    Σ_j q_j a_{k−j} = 0 for k = m+1..m+n gives q, then p_k = Σ_{j≤k} q_j a_{k−j}. Exact fractions."""
    a = sqrt_taylor_coefficients(m + n)
    size = n
    # Solve the n×n system for q_1..q_n by Gaussian elimination over the rationals.
    rows = [[a[k - j] if k - j >= 0 else Fraction(0) for j in range(1, n + 1)] + [-a[k]]
            for k in range(m + 1, m + n + 1)]
    for col in range(size):
        pivot = next(r for r in range(col, size) if rows[r][col] != 0)
        rows[col], rows[pivot] = rows[pivot], rows[col]
        for r in range(size):
            if r != col and rows[r][col] != 0:
                factor = rows[r][col] / rows[col][col]
                rows[r] = [x - factor * y for x, y in zip(rows[r], rows[col])]
    q = [Fraction(1)] + [rows[i][size] / rows[i][i] for i in range(size)]
    p = [sum(q[j] * a[k - j] for j in range(min(k, n) + 1)) for k in range(m + 1)]
    return p, q


_P, _Q = (tuple(float(c) for c in coefficients) for coefficients in pade_coefficients(5, 5))
_TAYLOR = tuple(float(c) for c in sqrt_taylor_coefficients(10))


def _polynomial(powers: List[Tensor], coefficients) -> Tensor:
    return sum(c * r for c, r in zip(coefficients, powers))


def sqrt_unit(a: Tensor, method: str = "mpa", inverse_iterations: int = 0) -> Tensor:
    """√Â for Â with eigenvalues in [0, 1] (Frobenius-normalised), by the [5/5] Padé approximant or the
    degree-10 Taylor polynomial of √(1 − z) at R = I − Â. (B, d, d) -> (B, d, d).

    ``inverse_iterations`` > 0 replaces the Cholesky solve by Q⁻¹ from that many Newton–Schulz iterations
    (:func:`finegrained.ops.newton_schulz.inv_newton_schulz`; matmuls only, for ONNX, which has no solver).
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    eye = torch.eye(a.shape[-1], dtype=a.dtype, device=a.device).expand_as(a)
    r = eye - a
    degree = 5 if method == "mpa" else 10
    powers = [eye, r]
    for _ in range(degree - 1):
        powers.append(powers[-1] @ r)
    if method == "mtp":
        return _polynomial(powers, _TAYLOR)
    # P and Q are polynomials in the same symmetric R, so they commute (Q⁻¹P = PQ⁻¹), and Q is symmetric positive
    # definite: q(z) decreases from 1 to q(1) ≈ 0.0107 on [0, 1], where R's eigenvalues lie. A Cholesky solve
    # is half the work of LU, and avoids the batched LU of torch 2.14's CPU build, which fails for 256×256
    # matrices with several threads ("Pivots given to lu_solve must all be greater or equal to 1").
    q, p = _polynomial(powers, _Q), _polynomial(powers, _P)
    if inverse_iterations:
        return inv_newton_schulz(q, inverse_iterations) @ p
    return torch.cholesky_solve(p, torch.linalg.cholesky(q))


@full_precision
def sqrtm_pade(sigma: Tensor, method: str = "mpa", backward_iterations: int = 8, inverse_iterations: int = 0) -> Tensor:
    """Matrix square root of symmetric PSD matrices by MPA-Lya (default) or MTP-Lya.

    Args:
        sigma: (B, d, d) symmetric positive semi-definite.
        method: ``"mpa"`` ([5/5] Padé, one linear solve) or ``"mtp"`` (degree-10 Taylor, matmuls only).
        backward_iterations: coupled sign iterations of the Lyapunov backward (8 in the paper's code).
        inverse_iterations: 0 (a Cholesky solve) or the Newton–Schulz iterations of Q⁻¹ (the ONNX form).
    Returns:
        (B, d, d) approximation of Σ^{1/2}.
    """
    check_square(sigma)
    forward = functools.partial(sqrt_unit, method=method, inverse_iterations=inverse_iterations)
    # Â's root has eigenvalues in [0, 1] already: the sign iteration starts from it as it is.
    return root_with_lyapunov_backward(sigma, forward, backward_iterations, normalise_root=False)
