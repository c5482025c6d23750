"""Second-order statistics of feature maps and the small matrix helpers every family uses.

* :func:`covariance` -- the sample covariance of a feature map, as in MPN-COV (Li et al., ICCV 2017)
  and iSQRT-COV (Li et al., CVPR 2018).
* :func:`gram` -- the uncentred second moment of B-CNN (Lin, RoyChowdhury, Maji, ICCV 2015).
* :func:`triu_vec` -- upper-triangular vectorisation of symmetric matrices.
* :func:`signed_sqrt` -- element-wise signed square root of B-CNN.
* :func:`sym` -- the symmetric part of square matrices.

Shapes use B for the batch, C (or d) for channels and M = H*W for positions.
"""
from __future__ import annotations

import torch
from torch import Tensor

from finegrained.ops.precision import full_precision


def positions(x: Tensor) -> Tensor:
    """(B, C, H, W) or (B, C, M) -> (B, C, M)."""
    if x.dim() == 4:
        return x.flatten(2)
    if x.dim() == 3:
        return x
    raise ValueError(f"expected a (B,C,H,W) feature map or (B,C,M) matrix, got shape {tuple(x.shape)}")


@full_precision
def gram(x: Tensor) -> Tensor:
    """Uncentred second moment G = (1/M) X Xᵀ.

    Args:
        x: (B, C, H, W) feature map (or (B, C, M)).
    Returns:
        (B, C, C) symmetric positive semi-definite matrices.
    """
    x = positions(x)
    return torch.bmm(x, x.transpose(1, 2)).div_(x.shape[-1])


@full_precision
def covariance(x: Tensor) -> Tensor:
    """Sample covariance Σ = (1/M) Σ_i (x_i − μ)(x_i − μ)ᵀ over the M = H·W positions.

    The official iSQRT-COV code multiplies by an explicit M×M centring matrix;
    subtracting the mean gives the same Σ with O(C·M) memory instead of O(M²).

    Args:
        x: (B, C, H, W) feature map (or (B, C, M)).
    Returns:
        (B, C, C) covariance matrices (biased, i.e. normalised by M).
    """
    x = positions(x)
    centred = x - x.mean(dim=2, keepdim=True)
    return torch.bmm(centred, centred.transpose(1, 2)).div_(x.shape[-1])


def batch_trace(m: Tensor) -> Tensor:
    """(B, d, d) -> (B,)"""
    return m.diagonal(dim1=-2, dim2=-1).sum(-1)


def safe_normaliser(t: Tensor) -> Tensor:
    """A positive normaliser (trace or norm), with 1 in place of (numerically) zero values.

    Dividing a zero matrix by 1 keeps it zero; dividing by a clamped tiny value instead would make
    the gradient 1/tiny = inf.
    """
    return torch.where(t > torch.finfo(t.dtype).tiny, t, torch.ones_like(t))


def unit_frobenius(m: Tensor):
    """(M/‖M‖_F, ‖M‖_F (B, 1, 1)): the eigenvalues of a PSD M/‖M‖_F lie in [0, 1], where Newton–Schulz converges."""
    norm = safe_normaliser(torch.linalg.matrix_norm(m)).view(-1, 1, 1)
    return m / norm, norm


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


def sym(m: Tensor) -> Tensor:
    """Symmetric part ½(M + Mᵀ) of (…, d, d) matrices."""
    return 0.5 * (m + m.transpose(-1, -2))


def check_square(m: Tensor) -> None:
    if m.dim() != 3 or m.shape[-1] != m.shape[-2]:
        raise ValueError(f"expected (B, d, d) matrices, got shape {tuple(m.shape)}")
