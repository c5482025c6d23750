"""G²DeNet: global Gaussian distribution embedding.

Wang, Li, Zhang, "G²DeNet: Global Gaussian Distribution Embedding Network and Its Application to
Visual Recognition", CVPR 2017.

    x ← sign(x)√|x| element-wise (0 where |x| ≤ 10⁻⁶)
    N(μ, Σ) ↦ Y = [[Σ + μμᵀ, μ], [μᵀ, 1]]  ((d+1) × (d+1))
    Y^α = U (λ + ε)^α Uᵀ  (eigendecomposition; or ``method="ns"``: Newton–Schulz of Y + εI)
    -> all (d+1)² values (or the upper triangle with ``triu=True``) -> sign(z)√(|z| + 10⁻⁸) -> l2

Defaults from the paper and its code: α = ½ ("0.3–0.6 is ok"), ε = 1e-3, feature threshold 1e-6,
full (d+1)² output: 263,169 values for VGG-16's d = 512. The official code keeps eigenvalues
> 1e-10 and drops the rest; here every eigenvalue (clamped at 0) gets (λ + ε)^α, the same map on the
kept ones and a continuous one on the rest.

ONNX has no eigendecomposition: for export the ``eig`` method is replaced by Newton–Schulz on
Y + εI (``substitute_iterations``); ``finegrained export`` measures and prints the error.

Shapes: (B, C, H, W) -> (B, (d+1)²) or (B, (d+1)(d+2)/2), d = reduction or C.
"""
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from finegrained.heads import PoolingHead, register_head
from finegrained.heads.reduction import optional_reduction
from finegrained.ops import (covariance, eig_power, float32_matrices, powm_newton_schulz, signed_sqrt,
                             sqrtm_newton_schulz, triu_vec)

FEATURE_THRESHOLD = 1e-6


def thresholded_signed_sqrt(x: Tensor, threshold: float = FEATURE_THRESHOLD) -> Tensor:
    """sign(x)√|x|, and 0 where |x| ≤ threshold (the gradient of √ is unbounded at 0)."""
    kept = x.abs() > threshold
    return torch.where(kept, torch.sign(x) * torch.where(kept, x.abs(), torch.ones_like(x)).sqrt(),
                       torch.zeros_like(x))


def gaussian_embedding(x: Tensor) -> Tensor:
    """(B, d, H, W) -> (B, d+1, d+1) matrices [[Σ + μμᵀ, μ], [μᵀ, 1]]."""
    flat = x.flatten(2)
    mu = flat.mean(-1, keepdim=True)  # (B, d, 1)
    top = torch.cat([covariance(flat) + mu @ mu.transpose(1, 2), mu], dim=2)
    bottom = torch.cat([mu.transpose(1, 2), torch.ones_like(mu[:, :1])], dim=2)
    return torch.cat([top, bottom], dim=1)


@register_head("g2de", "G²DeNet")
class G2DeNetHead(PoolingHead):
    """G²DeNet head.

    Args:
        in_channels: C.
        reduction: channels after a 1×1 reduction (BN, ReLU); ``None`` (default, paper) keeps C.
        method: ``"eig"`` (paper) or ``"ns"`` (Newton–Schulz, ``iterations``).
        alpha: the power (½, the paper's square root).
        eps: the eigenvalue offset (1e-3).
        triu: output the upper triangle instead of all (d+1)² values.
        iterations: Newton–Schulz iterations for ``method="ns"`` (5, as iSQRT-COV).
        substitute_iterations: Newton–Schulz iterations of the ONNX substitute for ``eig``.
        sqrt_eps: ε of the signed square root sign(z)√(|z| + ε) of the output.
    """
    paper = ('Wang, Li, Zhang, "G²DeNet: Global Gaussian Distribution Embedding Network and Its Application to '
             'Visual Recognition", CVPR 2017.')

    def __init__(self, in_channels: int, reduction: Optional[int] = None, method: str = "eig", alpha: float = 0.5,
                 eps: float = 1e-3, triu: bool = False, iterations: int = 5, substitute_iterations: int = 20,
                 sqrt_eps: float = 1e-8):
        super().__init__()
        if method not in ("eig", "ns"):
            raise ValueError(f"unknown g2de method {method!r}; known: eig, ns")
        if method == "ns" and alpha != 0.5:
            raise ValueError("g2de method='ns' computes the square root only (alpha=0.5)")
        self.reduce, self.dim = optional_reduction(in_channels, reduction)
        self.method, self.alpha, self.eps, self.triu = method, alpha, eps, triu
        self.iterations, self.substitute_iterations, self.sqrt_eps = iterations, substitute_iterations, sqrt_eps
        n = self.dim + 1
        self.output_dim = n * (n + 1) // 2 if triu else n * n

    def export_substitute(self) -> str:
        if self.method == "ns":
            return "g2de: none needed (method='ns')"
        return f"g2de: (Y+εI)^{self.alpha} by Newton–Schulz square roots, {self.substitute_iterations} iterations"

    def forward(self, x: Tensor) -> Tensor:
        return self.pool(self.reduce(x))

    @float32_matrices
    def pool(self, x: Tensor) -> Tensor:
        y = gaussian_embedding(thresholded_signed_sqrt(x))
        if self.method == "ns":
            eye = torch.eye(y.shape[-1], dtype=y.dtype, device=y.device)
            root = sqrtm_newton_schulz(y + self.eps * eye, self.iterations)
        elif self.use_substitute:
            root = powm_newton_schulz(y, self.alpha, self.eps, self.substitute_iterations)
        else:
            root = eig_power(y, self.alpha, self.eps)
        z = triu_vec(root) if self.triu else root.flatten(1)
        return F.normalize(signed_sqrt(z, self.sqrt_eps), dim=1)
