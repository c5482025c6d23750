"""The coupled Newton–Schulz iteration for the matrix square root and inverse square root.

* :func:`newton_schulz` -- the one iteration (Higham, "Functions of Matrices", 2008, eq. 6.35), on matrices with
  eigenvalues in (0, 1].
* :func:`sqrtm_newton_schulz` -- the iterative matrix square root of iSQRT-COV: "Towards Faster Training of Global
  Covariance Pooling Networks by Iterative Matrix Square Root Normalization", Li, Xie, Wang, Gao, CVPR 2018 (trace
  pre-normalisation, N iterations, √tr post-compensation); autograd through the iteration.
* :func:`inv_newton_schulz` -- iSICE's inverse, the square of the Newton–Schulz inverse square root.

The fused iSQRT-COV with its lean backward is :mod:`finegrained.ops.isqrt`; the Lyapunov backward of improved
B-CNN and MPA-Lya is :mod:`finegrained.ops.lyapunov`. Shapes: (B, d, d) matrices.
"""
from __future__ import annotations

import torch
from torch import Tensor

from finegrained.ops.covariance import batch_trace, check_square, safe_normaliser
from finegrained.ops.precision import full_precision


def newton_schulz(a: Tensor, iterations: int, inverse: bool = False) -> Tensor:
    """Y_N (→ A^{1/2}) or, with ``inverse``, Z_N (→ A^{-1/2}) of the coupled Newton–Schulz iteration;
    every square root and inverse square root here uses it.

    Y₀ = A, Z₀ = I, and for k = 1..N with T_k = ½(3I − Z_{k−1} Y_{k−1}):
    Y_k = Y_{k−1} T_k,  Z_k = T_k Z_{k−1}  (Higham, "Functions of Matrices", 2008; iSQRT-COV).

    The first step uses Z₀ = I (T₁ = ½(3I − A), one matmul) and the last computes Y only; both
    are exact rewrites of the iteration, not approximations. It converges when the eigenvalues of
    the symmetric A lie in (0, 1]: callers normalise by the trace (iSQRT-COV) or the Frobenius norm.

    Args:
        a: (B, d, d) symmetric positive semi-definite matrices, normalised.
        iterations: N ≥ 1.
    Returns:
        (B, d, d) approximation of A^{1/2} (of A^{-1/2} with ``inverse``).
    """
    if iterations < 1:
        raise ValueError(f"iterations must be >= 1, got {iterations}")
    eye3 = 3.0 * torch.eye(a.shape[-1], dtype=a.dtype, device=a.device)
    t = 0.5 * (eye3 - a)
    if iterations == 1:
        return t if inverse else a @ t
    y, z = a @ t, t
    for _ in range(iterations - 2):
        t = 0.5 * (eye3 - z @ y)
        y, z = y @ t, t @ z
    t = 0.5 * (eye3 - z @ y)
    return t @ z if inverse else y @ t


@full_precision
def inv_newton_schulz(sigma: Tensor, iterations: int = 7) -> Tensor:
    """Σ⁻¹ as the square of iSQRT-COV's inverse square root, as iSICE computes it (``nsInv``):
    Z_N(Σ/tr Σ)² / tr Σ, differentiated by autograd through the iterations.

    Rahman, Koniusz, Harandi et al., "Learning Partial Correlation based Deep Visual Representation for
    Image Classification" (iSICE), CVPR 2023. Exact for N → ∞ when Σ is SPD; with few iterations it
    under-weights the smallest eigenvalues, as the published method does.

    Args:
        sigma: (B, d, d) symmetric positive definite.
        iterations: N (7 in iSICE).
    Returns:
        (B, d, d) approximation of Σ⁻¹.
    """
    check_square(sigma)
    trace = safe_normaliser(batch_trace(sigma)).view(-1, 1, 1)
    z = newton_schulz(sigma / trace, iterations, inverse=True)
    return z @ z / trace


@full_precision
def sqrtm_newton_schulz(sigma: Tensor, iterations: int = 5) -> Tensor:
    """Approximate matrix square root of SPD matrices by coupled Newton–Schulz (iSQRT-COV).

    1. Pre-normalise by the trace, A = Σ / tr Σ, so that ‖I − A‖ < 1 and the
       iteration converges.
    2. N iterations of :func:`newton_schulz`.
    3. Post-compensate: √(tr Σ) · Y_N.

    Args:
        sigma: (B, d, d) symmetric positive semi-definite matrices.
        iterations: N ≥ 1 (5 in the fine-grained and ImageNet models, 3 in GM-SOP).
    Returns:
        (B, d, d) approximation of Σ^{1/2}.
    """
    if iterations < 1:
        raise ValueError(f"iterations must be >= 1, got {iterations}")
    check_square(sigma)
    # A zero matrix (all-zero or constant features) has trace 0: it stays exactly 0, not NaN.
    trace = safe_normaliser(batch_trace(sigma)).view(-1, 1, 1)
    return newton_schulz(sigma / trace, iterations) * trace.sqrt()
