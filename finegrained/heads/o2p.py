"""DeepO2P: log-Euclidean second-order pooling.

Ionescu, Vantzos, Sminchisescu, "Matrix Backpropagation for Deep Networks with Structured Layers",
ICCV 2015, after O2P (Carreira, Caseiro, Batista, Sminchisescu, ECCV 2012).

    optional 1×1 reduction  ->  Σ  ->  log(Σ + εI) = U log(λ + ε) Uᵀ  ->  upper triangle

Eigenvalues at or below d·eps(λ_max) count as 0 (O2P keeps eigenvalues above D·eps(max)). The
backward is the K-matrix of matrix backpropagation; K entries of equal eigenvalues are 0.
Defaults: ε = 1e-3 (the regulariser that makes Σ + εI positive definite; the same value as
G²DeNet's), no reduction (DeepO2P pools the full map: 131,328 values for C = 512).

ONNX has no eigendecomposition: for export the log is computed by inverse scaling and squaring
(:func:`finegrained.ops.logm_newton_schulz`: Newton–Schulz square roots and the Mercator
series); ``finegrained export`` measures and prints its error.

Shapes: (B, C, H, W) -> (B, d(d+1)/2), d = reduction or C.
"""
from typing import Optional

from torch import Tensor

from finegrained.heads import register_head
from finegrained.heads.covariance_pooling import CovariancePoolingHead
from finegrained.ops import eig_log, logm_newton_schulz


@register_head("o2p", "DeepO2P")
class DeepO2PHead(CovariancePoolingHead):
    """DeepO2P head.

    Args:
        in_channels: C.
        reduction: channels after a 1×1 reduction (BN, ReLU); ``None`` (default) keeps C.
        eps: the regulariser ε (1e-3).
        substitute_roots: square roots taken by the ONNX substitute's inverse scaling and squaring.
        substitute_iterations: Newton–Schulz iterations of each of those roots.
    """
    paper = ('Ionescu, Vantzos, Sminchisescu, "Matrix Backpropagation for Deep Networks with Structured Layers", '
             "ICCV 2015.")

    def __init__(self, in_channels: int, reduction: Optional[int] = None, eps: float = 1e-3,
                 substitute_roots: int = 6, substitute_iterations: int = 22):
        if not eps > 0:
            raise ValueError(f"o2p needs eps > 0 (log 0 is -inf), got {eps}")
        super().__init__(in_channels, reduction)
        self.eps, self.substitute_roots, self.substitute_iterations = eps, substitute_roots, substitute_iterations

    def export_substitute(self) -> str:
        return (f"o2p: log by inverse scaling and squaring, {self.substitute_roots} Newton–Schulz square roots "
                f"({self.substitute_iterations} iterations for the first) + 12-term series")

    def matrix_function(self, sigma: Tensor) -> Tensor:
        if self.use_substitute:
            return logm_newton_schulz(sigma, self.eps, self.substitute_roots, self.substitute_iterations)
        return eig_log(sigma, self.eps)
