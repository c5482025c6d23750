"""MPN-COV: covariance pooling with matrix power normalisation by eigendecomposition.

Li, Xie, Wang, Zuo, "Is Second-order Information Helpful for Large-scale Visual Recognition?",
ICCV 2017.

    optional 1×1 reduction (C -> 256, BN, ReLU)  ->  Σ  ->  Q = U (λ + ε)^α Uᵀ  ->  upper triangle

Eigenvalues at or below d·eps(λ_max) count as 0 (rank-deficient Σ when M < d). The backward is the
matrix-backprop K-matrix of Ionescu et al. (ICCV 2015); K entries of equal eigenvalues are 0.
Defaults: α = ½ (paper), ε = 0 (the official README; the code uses 1e-12), reduction to 256
(the official fine-grained and ImageNet models: 32,896 values).

ONNX has no eigendecomposition: for export, Q is computed by Newton–Schulz square roots
(:func:`finegrained.ops.powm_newton_schulz`, α = 2^-k only, ``substitute_iterations`` each);
``finegrained export`` measures and prints the error of that substitute.

Shapes: (B, C, H, W) -> (B, d(d+1)/2), d = reduction or C.
"""
from typing import Optional

from torch import Tensor

from finegrained.heads import register_head
from finegrained.heads.covariance_pooling import CovariancePoolingHead
from finegrained.ops import eig_power, powm_newton_schulz


@register_head("mpncov", "MPN-COV")
class MPNCovHead(CovariancePoolingHead):
    """MPN-COV head.

    Args:
        in_channels: C.
        reduction: channels after the 1×1 reduction (256); ``None`` keeps C.
        alpha: the matrix power (½).
        eps: added to the eigenvalues (0).
        substitute_iterations: Newton–Schulz iterations per square root of the ONNX substitute.
    """
    paper = 'Li, Xie, Wang, Zuo, "Is Second-order Information Helpful for Large-scale Visual Recognition?", ICCV 2017.'

    def __init__(self, in_channels: int, reduction: Optional[int] = 256, alpha: float = 0.5, eps: float = 0.0,
                 substitute_iterations: int = 20):
        super().__init__(in_channels, reduction)
        self.alpha, self.eps, self.substitute_iterations = alpha, eps, substitute_iterations

    def export_substitute(self) -> str:
        return (f"mpncov: (Σ+εI)^{self.alpha} by Newton–Schulz square roots, "
                f"{self.substitute_iterations} iterations each")

    def matrix_function(self, sigma: Tensor) -> Tensor:
        if self.use_substitute:
            return powm_newton_schulz(sigma, self.alpha, self.eps, self.substitute_iterations)
        return eig_power(sigma, self.alpha, self.eps)
