"""The shared skeleton of global covariance pooling heads (iSQRT-COV, MPN-COV, DeepO2P).

    optional 1×1 reduction (C -> d, BN, ReLU)  ->  Σ (d × d)  ->  f(Σ)  ->  upper triangle

Subclasses define the matrix function f. Shapes: (B, C, H, W) -> (B, d(d+1)/2).
"""
from typing import Optional

from torch import Tensor, nn

from finegrained.heads._layers import optional_reduction
from finegrained.heads._precision import float32_matrices
from finegrained.linalg import covariance, triu_vec


class CovariancePoolingHead(nn.Module):
    def __init__(self, in_channels: int, reduction: Optional[int]):
        super().__init__()
        self.reduce, self.dim = optional_reduction(in_channels, reduction)
        self.output_dim = self.dim * (self.dim + 1) // 2

    def matrix_function(self, sigma: Tensor) -> Tensor:
        """(B, d, d) covariance -> (B, d, d) normalised matrix."""
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        return self.pool(self.reduce(x))

    @float32_matrices
    def pool(self, x: Tensor) -> Tensor:
        return triu_vec(self.matrix_function(covariance(x)))
