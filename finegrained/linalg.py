"""Matrix functions for global second-order pooling.

Pure tensor functions (they import nothing but torch) shared by the heads in
:mod:`finegrained.heads`:

* :func:`covariance` -- the sample covariance of a feature map, as in
  MPN-COV (Li et al., ICCV 2017) and iSQRT-COV (Li et al., CVPR 2018).
* :func:`sqrtm_newton_schulz` -- the iterative matrix square root of
  iSQRT-COV: "Towards Faster Training of Global Covariance Pooling Networks by
  Iterative Matrix Square Root Normalization", Li, Xie, Wang, Gao, CVPR 2018.
* :func:`triu_vec` -- upper-triangular vectorisation of symmetric matrices.
* :func:`signed_sqrt` -- element-wise signed square root of B-CNN
  (Lin, RoyChowdhury, Maji, ICCV 2015).

Shapes use B for the batch, C (or d) for channels and M = H*W for positions.
"""
from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["covariance", "gram", "sqrtm_newton_schulz", "triu_vec", "signed_sqrt"]


def _positions(x: Tensor) -> Tensor:
    """(B, C, H, W) or (B, C, M) -> (B, C, M)."""
    if x.dim() == 4:
        return x.flatten(2)
    if x.dim() == 3:
        return x
    raise ValueError(f"expected a (B,C,H,W) feature map or (B,C,M) matrix, got shape {tuple(x.shape)}")


def gram(x: Tensor) -> Tensor:
    """Uncentred second moment G = (1/M) X Xᵀ.

    Args:
        x: (B, C, H, W) feature map (or (B, C, M)).
    Returns:
        (B, C, C) symmetric positive semi-definite matrices.
    """
    x = _positions(x)
    return torch.bmm(x, x.transpose(1, 2)).div_(x.shape[-1])


def covariance(x: Tensor) -> Tensor:
    """Sample covariance Σ = (1/M) Σ_i (x_i − μ)(x_i − μ)ᵀ over the M = H·W positions.

    The official iSQRT-COV code multiplies by an explicit M×M centring matrix;
    subtracting the mean gives the same Σ with O(C·M) memory instead of O(M²).

    Args:
        x: (B, C, H, W) feature map (or (B, C, M)).
    Returns:
        (B, C, C) covariance matrices (biased, i.e. normalised by M).
    """
    x = _positions(x)
    centred = x - x.mean(dim=2, keepdim=True)
    return torch.bmm(centred, centred.transpose(1, 2)).div_(x.shape[-1])


def _batch_trace(m: Tensor) -> Tensor:
    """(B, d, d) -> (B,)"""
    return m.diagonal(dim1=-2, dim2=-1).sum(-1)


def sqrtm_newton_schulz(sigma: Tensor, iterations: int = 5) -> Tensor:
    """Approximate matrix square root of SPD matrices by coupled Newton–Schulz (iSQRT-COV).

    1. Pre-normalise by the trace, A = Σ / tr Σ, so that ‖I − A‖ < 1 and the
       iteration converges.
    2. Y₀ = A, Z₀ = I, and for k = 1..N with T_k = ½(3I − Z_{k−1} Y_{k−1}):
       Y_k = Y_{k−1} T_k,  Z_k = T_k Z_{k−1}.
    3. Post-compensate: √(tr Σ) · Y_N.

    The first step uses Z₀ = I (T₁ = ½(3I − A)) and the last step computes Y only;
    both are exact rewrites of the same iteration, not approximations.

    Args:
        sigma: (B, d, d) symmetric positive semi-definite matrices.
        iterations: N ≥ 1 (5 in the fine-grained and ImageNet models, 3 in GM-SOP).
    Returns:
        (B, d, d) approximation of Σ^{1/2}.
    """
    if iterations < 1:
        raise ValueError(f"iterations must be >= 1, got {iterations}")
    if sigma.dim() != 3 or sigma.shape[-1] != sigma.shape[-2]:
        raise ValueError(f"expected (B, d, d) matrices, got shape {tuple(sigma.shape)}")
    d = sigma.shape[-1]
    # A zero matrix (all-zero or constant features) has trace 0; clamping keeps
    # the output at exactly 0 instead of NaN and changes nothing otherwise.
    trace = _batch_trace(sigma).clamp_min(torch.finfo(sigma.dtype).tiny)
    a = sigma / trace.view(-1, 1, 1)
    eye3 = 3.0 * torch.eye(d, dtype=sigma.dtype, device=sigma.device)

    t = 0.5 * (eye3 - a)
    y = a @ t
    if iterations == 1:
        return y * trace.sqrt().view(-1, 1, 1)
    z = t
    for _ in range(iterations - 2):
        t = 0.5 * (eye3 - z @ y)
        y, z = y @ t, t @ z
    y = y @ (0.5 * (eye3 - z @ y))
    return y * trace.sqrt().view(-1, 1, 1)


def triu_indices_flat(d: int, device: torch.device | None = None) -> Tensor:
    """Flat (row-major) indices of the upper triangle of a d×d matrix, diagonal included,
    in the order of ``torch.triu_indices(d, d)``: d(d+1)/2 entries."""
    rows, cols = torch.triu_indices(d, d, device=device)
    return rows * d + cols


def triu_vec(m: Tensor) -> Tensor:
    """Upper-triangular vectorisation, diagonal included, row-major, without rescaling.

    Args:
        m: (B, d, d) matrices (symmetric in every use here).
    Returns:
        (B, d(d+1)/2); for d = 256 that is 32,896 values.
    """
    if m.dim() != 3 or m.shape[-1] != m.shape[-2]:
        raise ValueError(f"expected (B, d, d) matrices, got shape {tuple(m.shape)}")
    d = m.shape[-1]
    return m.flatten(1).index_select(1, triu_indices_flat(d, m.device))


def signed_sqrt(x: Tensor, eps: float = 1e-5) -> Tensor:
    """Element-wise signed square root sign(x)·√(|x| + ε) of B-CNN.

    ε sits inside the root so that the gradient stays finite at 0.

    Args:
        x: any shape.
    Returns:
        same shape as ``x``.
    """
    return torch.sign(x) * torch.sqrt(x.abs() + eps)
