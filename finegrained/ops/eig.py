"""Matrix functions through the symmetric eigendecomposition, with the K-matrix backward.

* :func:`eig_power`, :func:`eig_log` -- matrix power and logarithm with the matrix-backprop
  backward of Ionescu, Vantzos, Sminchisescu, "Matrix Backpropagation for Deep Networks with
  Structured Layers", ICCV 2015; used by MPN-COV (Li, Xie, Wang, Zuo, ICCV 2017), DeepO2P and
  G²DeNet (Wang, Li, Zhang, CVPR 2017).

* :func:`symmetric_eigh` -- the eigendecomposition every head here uses: of a scale-normalised matrix,
  retried in float64 and then with a tiny ridge, so that it never stops a training run.

Shapes: (B, d, d) symmetric positive semi-definite matrices in and out.
"""
from __future__ import annotations

import logging
from typing import Tuple

import torch
from torch import Tensor

from finegrained.ops.backward import first_order_only
from finegrained.ops.covariance import batch_trace, check_square, safe_normaliser, sym
from finegrained.ops.precision import full_precision

_log = logging.getLogger(__name__)
_reported = set()
RIDGE = 1e-6  # relative to the mean eigenvalue, for the last retry


def _report_once(what: str, message: str) -> None:
    if what not in _reported:
        _reported.add(what)
        _log.warning(message)


def symmetric_eigh(sigma: Tensor) -> Tuple[Tensor, Tensor]:
    """(λ ascending (B, d), U (B, d, d)) of symmetric (B, d, d) matrices, without failing.

    The solver sees Σ / s with s the mean absolute diagonal entry (1 for a zero matrix), so the result does
    not depend on the absolute scale: features at 1e-12 or 1e12, or a constant map turned into ~1e-6 values
    by BatchNorm, give covariances the float32 solver otherwise fails on ("failed to converge"); λ is scaled
    back. If the solver still fails it is retried in float64, then on Σ/s + 1e-6·I (the ridge subtracted
    from λ again); each retry is logged once. A training step never stops here.
    """
    d = sigma.shape[-1]
    scale = safe_normaliser(batch_trace(sigma.abs()) / d).view(-1, 1, 1)
    matrix = sym(sigma) / scale
    attempts = ((matrix, 0.0, None),
                (matrix.double(), 0.0, "eigh failed to converge; retrying in float64 (logged once)"),
                (matrix.double() + RIDGE * torch.eye(d, dtype=torch.float64, device=matrix.device), RIDGE,
                 f"eigh failed in float64 too; retrying with a ridge of {RIDGE:g} × the mean eigenvalue (logged once)"))
    for candidate, ridge, message in attempts:
        if message:
            _report_once(message, message)
        try:
            lam, u = torch.linalg.eigh(candidate)
        except torch.linalg.LinAlgError:
            continue
        return (lam - ridge).to(sigma.dtype) * scale.view(-1, 1), u.to(sigma.dtype)
    _report_once("diagonal", "eigh failed with a ridge too; using the diagonal (logged once)")
    return torch.diagonal(sigma, dim1=-2, dim2=-1).clone(), torch.eye(d, dtype=sigma.dtype, device=sigma.device).expand_as(
        sigma).clone()


def _eig_spectrum(sigma: Tensor):
    """Eigendecomposition with numerically-zero eigenvalues clamped to exactly 0.

    Eigenvalues at or below d·eps·λ_max (the O2P rule, "keep eigenvalues > D·eps(max)") are
    rounding noise of a rank-deficient matrix; they are set to 0 and marked as not kept.
    Returns (λ clamped (B, d), U (B, d, d), kept mask (B, d), cutoff (B, 1)).
    """
    lam, u = symmetric_eigh(sigma)
    d = sigma.shape[-1]
    lam_max = lam.amax(dim=-1, keepdim=True).clamp_min(0)
    cutoff = (d * torch.finfo(lam.dtype).eps * lam_max).clamp_min(torch.finfo(lam.dtype).tiny)
    kept = lam > cutoff
    return torch.where(kept, lam, torch.zeros_like(lam)), u, kept, cutoff


def _spectral_map(lam: Tensor, kept: Tensor, kind: str, alpha: float, eps: float):
    """f(λ) and f'(λ) of the spectral function; f' is 0 for eigenvalues that were clamped."""
    shifted = lam + eps
    if kind == "power":
        # Clamped eigenvalues with eps = 0 map to 0^α = 0; their derivative α·0^(α-1) is not used.
        safe = torch.where(shifted > 0, shifted, torch.ones_like(shifted))
        value = torch.where(shifted > 0, safe.pow(alpha), torch.zeros_like(shifted))
        slope = alpha * safe.pow(alpha - 1)
    elif kind == "log":
        value = torch.log(shifted)
        slope = 1.0 / shifted
    else:
        raise ValueError(f"unknown spectral function {kind!r}")
    return value, torch.where(kept, slope, torch.zeros_like(slope))


def _spectral_forward(sigma: Tensor, kind: str, alpha: float, eps: float):
    lam, u, kept, cutoff = _eig_spectrum(sigma)
    value, slope = _spectral_map(lam, kept, kind, alpha, eps)
    return u @ torch.diag_embed(value) @ u.transpose(-1, -2), (lam, u, value, slope, cutoff)


def _spectral(sigma: Tensor, kind: str, alpha: float, eps: float) -> Tensor:
    if torch.is_grad_enabled() and sigma.requires_grad:
        return _SymmetricEigFunction.apply(sigma, kind, alpha, eps)
    return _spectral_forward(sigma, kind, alpha, eps)[0]  # inference and tracing: no autograd.Function


class _SymmetricEigFunction(torch.autograd.Function):
    """Q = U f(Λ) Uᵀ with the backward of Ionescu et al. (ICCV 2015):

        ∂l/∂U = (G + Gᵀ) U f(Λ),  ∂l/∂Λ = f'(Λ) (Uᵀ G U)_diag,
        ∂l/∂Σ = U { sym(Kᵀ ∘ (Uᵀ ∂l/∂U)) + (∂l/∂Λ)_diag } Uᵀ,
        K_ij = 1 / (λ_i − λ_j) for i ≠ j.

    K entries of equal (or numerically equal) eigenvalues are set to 0, never ±inf: this is the
    rule of the MPN-COV code, and it keeps the gradient finite on repeated eigenvalues.

    Departure from the official code, on purpose: for a rank-deficient Σ (fewer positions than channels) the
    official ``EIG.m`` zeroes the eigenvectors of the (numerically) zero eigenvalues and the backward then drops
    every term that involves them. Here they are kept: K_ij = 1/λ_i between a kept and a zero eigenvalue, so the
    gradient is the exact one (it equals finite differences; the official one was 45 % off in our test).
    """

    @staticmethod
    def forward(ctx, sigma, kind, alpha, eps):
        out, saved = _spectral_forward(sigma, kind, alpha, eps)
        ctx.save_for_backward(*saved)
        return out

    @staticmethod
    @first_order_only("eig_power/eig_log")
    def backward(ctx, grad):
        lam, u, value, slope, cutoff = ctx.saved_tensors
        diff = lam.unsqueeze(-1) - lam.unsqueeze(-2)  # λ_i − λ_j
        distinct = diff.abs() > cutoff.unsqueeze(-1)
        k = torch.where(distinct, 1.0 / torch.where(distinct, diff, torch.ones_like(diff)), torch.zeros_like(diff))
        ut_g_u = u.transpose(-1, -2) @ grad @ u
        ut_dl_du = (ut_g_u + ut_g_u.transpose(-1, -2)) * value.unsqueeze(-2)  # Uᵀ(G+Gᵀ)U f(Λ)
        inner = sym(k.transpose(-1, -2) * ut_dl_du) + torch.diag_embed(slope * ut_g_u.diagonal(dim1=-2, dim2=-1))
        return u @ inner @ u.transpose(-1, -2), None, None, None


@full_precision
def eig_power(sigma: Tensor, alpha: float = 0.5, eps: float = 0.0) -> Tensor:
    """Matrix power U (λ + ε)^α Uᵀ of symmetric PSD matrices (MPN-COV, G²DeNet).

    Eigenvalues at or below d·eps(λ_max) count as 0 (rank-deficient covariances, M < C).

    Args:
        sigma: (B, d, d) symmetric positive semi-definite matrices.
        alpha: the power (½ in MPN-COV and G²DeNet).
        eps: added to every eigenvalue (0 in the MPN-COV README, 1e-3 in G²DeNet).
    Returns:
        (B, d, d) symmetric matrices.
    """
    check_square(sigma)
    if eps < 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    return _spectral(sigma, "power", float(alpha), float(eps))


@full_precision
def eig_log(sigma: Tensor, eps: float = 1e-3) -> Tensor:
    """Matrix logarithm log(Σ + εI) = U log(λ + ε) Uᵀ of symmetric PSD matrices (DeepO2P).

    Args:
        sigma: (B, d, d) symmetric positive semi-definite matrices.
        eps: > 0; the regulariser that makes Σ + εI positive definite.
    Returns:
        (B, d, d) symmetric matrices.
    """
    check_square(sigma)
    if not eps > 0:
        raise ValueError(f"the matrix logarithm needs eps > 0 (log 0 is -inf), got {eps}")
    return _spectral(sigma, "log", 1.0, float(eps))
