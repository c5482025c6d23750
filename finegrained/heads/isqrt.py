"""iSQRT-COV: covariance pooling with iterative matrix square-root normalisation.

Li, Xie, Wang, Gao, "Towards Faster Training of Global Covariance Pooling Networks by
Iterative Matrix Square Root Normalization", CVPR 2018.

Pipeline: optional reduction (1×1 conv C→r without bias, BN, ReLU; Kaiming fan_out init)
-> covariance Σ -> Newton–Schulz square root (trace pre-normalisation, N iterations,
√tr Σ post-compensation) -> upper triangle.

Shapes: (B, C, H, W) -> (B, d(d+1)/2) with d = r (or C without reduction);
r = 256 gives 32,896 values.
"""
from typing import Optional

from torch import Tensor

from finegrained.heads import register_head
from finegrained.heads.covariance_pooling import CovariancePoolingHead
from finegrained.ops import isqrt_cov


@register_head("isqrt", "iSQRT-COV")
class ISqrtCovHead(CovariancePoolingHead):
    """iSQRT-COV head.

    Args:
        in_channels: C of the backbone's feature map.
        reduction: channels after the 1×1 reduction (256 in the paper); ``None`` keeps C.
        iterations: Newton–Schulz iterations (5 in the paper's fine-grained models).
    """
    paper = ('Li, Xie, Wang, Gao, "Towards Faster Training of Global Covariance Pooling Networks by Iterative '
             'Matrix Square Root Normalization", CVPR 2018.')

    def __init__(self, in_channels: int, reduction: Optional[int] = 256, iterations: int = 5):
        super().__init__(in_channels, reduction)
        self.iterations = iterations

    def normalised_covariance(self, x: Tensor) -> Tensor:
        # One fused autograd.Function (covariance, Newton–Schulz, compensation) with under half the
        # saved memory of autograd through the same formulas and identical values; its exact backward
        # goes through eigh on CPUs and through the Newton–Schulz adjoint on CUDA (isqrt_backward_route).
        return isqrt_cov(x, self.iterations)
