"""Improved B-CNN: bilinear pooling with matrix square-root normalisation.

Lin & Maji, "Improved Bilinear Pooling with CNNs", BMVC 2017.

    A = (1/M)·X·Xᵀ (uncentred, as B-CNN)  ->  Z = NS(A/‖A‖_F)·√‖A‖_F  ->  sign(z)√(|z| + ε)  ->  l2

The square root uses the coupled Newton–Schulz iteration (5 iterations, the paper's choice), and
its backward is the authors' (``lyap_newton_schulz``, msubhransu/matrix-sqrt ``matrix_sqrt.py``): the
Lyapunov equation Z·X + X·Z = ∂l/∂Z solved by the coupled Newton–Schulz sign iteration (5 iterations) from
Z/‖Z‖_F, X returned as the gradient of A, instead of differentiating the unrolled forward or the normalisation.
Frobenius pre-normalisation is the paper's (iSQRT-COV uses the trace instead).

Shapes: (B, C, H, W) -> (B, C²); VGG-16 relu5_3 gives 262,144 values.
"""
import torch.nn.functional as F
from torch import Tensor

from finegrained.heads import PoolingHead, register_head
from finegrained.ops import float32_matrices, gram, signed_sqrt, sqrtm_newton_schulz_lyapunov


@register_head("improved_bcnn", "Improved B-CNN")
class ImprovedBCNNHead(PoolingHead):
    """Improved B-CNN head.

    Args:
        in_channels: C.
        iterations: forward Newton–Schulz iterations (5, paper).
        backward_iterations: Lyapunov-solver iterations of the backward (5, paper).
        eps: inside the element-wise signed square root (B-CNN).
    """
    paper = 'Lin, Maji, "Improved Bilinear Pooling with CNNs", BMVC 2017.'

    def __init__(self, in_channels: int, iterations: int = 5, backward_iterations: int = 5, eps: float = 1e-5):
        super().__init__()
        self.iterations, self.backward_iterations, self.eps = iterations, backward_iterations, eps
        self.output_dim = in_channels * in_channels

    @float32_matrices
    def forward(self, x: Tensor) -> Tensor:
        root = sqrtm_newton_schulz_lyapunov(gram(x), self.iterations, self.backward_iterations)
        return F.normalize(signed_sqrt(root.flatten(1), self.eps), dim=1)
