"""The shared skeleton of global covariance pooling heads (iSQRT-COV, MPN-COV, DeepO2P).

    optional 1×1 reduction (C -> d, BN, ReLU)  ->  Σ (d × d)  ->  f(Σ)  ->  upper triangle

Subclasses define the matrix function f, or replace Σ -> f(Σ) as a whole when a fused
implementation starts from the features (iSQRT-COV). Shapes: (B, C, H, W) -> (B, d(d+1)/2).
"""
from typing import Optional

from torch import Tensor

from finegrained.heads.base import PoolingHead
from finegrained.heads.reduction import optional_reduction
from finegrained.ops import covariance, float32_matrices, triu_vec


class CovariancePoolingHead(PoolingHead):
    def __init__(self, in_channels: int, reduction: Optional[int]):
        super().__init__()
        self.reduce, self.dim = optional_reduction(in_channels, reduction)
        self.output_dim = self.dim * (self.dim + 1) // 2

    def matrix_function(self, sigma: Tensor) -> Tensor:
        """(B, d, d) covariance -> (B, d, d) normalised matrix."""
        raise NotImplementedError

    def normalised_covariance(self, x: Tensor) -> Tensor:
        """(B, d, H, W) features -> (B, d, d) f(Σ)."""
        return self.matrix_function(covariance(x))

    def forward(self, x: Tensor) -> Tensor:
        return self.pool(self.reduce(x))

    @float32_matrices
    def pool(self, x: Tensor) -> Tensor:
        return triu_vec(self.normalised_covariance(x))
