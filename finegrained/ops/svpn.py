"""Singular-value power normalisation (svPN) of SoT's cross-covariance matrices.

Xie, Zeng, Long, Li, Wang, "SoT: Delving Deeper into Classification Head for Transformer", 2021
(code: jiangtaoxie/SoT, ``normalization/svPN.py``).

For P (B, r, r) (not symmetric) and a learnable start vector w (r,), one step of power iteration
estimates the top singular triplet, u = P w/‖P w‖, v = Pᵀu/‖Pᵀu‖, σ = uᵀP v (= ‖Pᵀu‖ ≥ 0), and

    Y = σ^α u vᵀ + (P − σ u vᵀ) / (σ^(1−α) + 1e−5)

which is ≈ P/√σ for α = ½: the top singular value is raised to the power α and the rest of the
spectrum divided alike. Gradients flow through u, v, σ and w.

Shapes: (B, r, r), (r,) -> (B, r, r).
"""
from __future__ import annotations

import torch
from torch import Tensor

from finegrained.ops.precision import full_precision

# A zero matrix (constant features) has σ = 0, where σ^α has an infinite derivative: σ is floored here,
# which changes nothing for any σ a real feature map gives.
SIGMA_FLOOR = 1e-12


def _unit(v: Tensor) -> Tensor:
    """v / ‖v‖ over the last axis; the zero vector stays zero (F.normalize's rule)."""
    return v / v.norm(dim=-1, keepdim=True).clamp_min(SIGMA_FLOOR)


@full_precision
def sv_power_normalise(p: Tensor, start: Tensor, alpha: float = 0.5, eps: float = 1e-5) -> Tensor:
    """svPN with one singular value and one power iteration (SoT's published setting).

    Args:
        p: (B, r, r) matrices.
        start: (r,) the learnable start vector w of the power iteration (shared by all matrices).
        alpha: the power (½).
        eps: added to σ^(1−α) in the denominator (1e-5).
    Returns:
        (B, r, r) normalised matrices.
    """
    if p.dim() != 3 or p.shape[-1] != p.shape[-2] or start.shape != p.shape[-1:]:
        raise ValueError(f"expected (B, r, r) matrices and an (r,) start vector, got {tuple(p.shape)} and "
                         f"{tuple(start.shape)}")
    u = _unit(torch.matmul(p, start.to(p.dtype)))                   # (B, r)
    v = _unit(torch.bmm(p.transpose(1, 2), u.unsqueeze(2)).squeeze(2))
    sigma = torch.bmm(u.unsqueeze(1), torch.bmm(p, v.unsqueeze(2))).view(-1, 1, 1)
    sigma = sigma.clamp_min(SIGMA_FLOOR)
    top = sigma * u.unsqueeze(2) * v.unsqueeze(1)                   # σ u vᵀ
    return sigma.pow(alpha - 1.0) * top + (p - top) / (sigma.pow(1.0 - alpha) + eps)
