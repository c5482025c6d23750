"""iSICE: iterative sparse inverse covariance estimation as a pooling head.

Rahman, Koniusz, Harandi, Wang, Li et al., "Learning Partial Correlation based Deep Visual
Representation for Image Classification", CVPR 2023 (code: csiro-robotics/iSICE).

    1×1 reduction (C -> 256, BN, ReLU) -> Σ -> C = Σ / tr Σ -> P (sparse precision matrix,
    :func:`finegrained.ops.sparse_inverse_covariance`: λ = 0.01, η = 1, 5 steps, 7 Newton–Schulz
    iterations per inverse) -> P / √tr P -> upper triangle

Output scaling: the authors' code has used P / tr Σ (first release), P / tr P, and since 2023-11
P / √tr P ("works better and faster convergence"). This head uses **P / √tr P**: it is the authors'
current choice, and it makes the representation independent of the scale of the features (C, hence P,
already is; dividing by tr Σ would bring the scale back in, by up to orders of magnitude across images).

Shapes: (B, C, H, W) -> (B, d(d+1)/2); 32,896 for d = 256.
"""
from __future__ import annotations

from typing import Optional

from torch import Tensor

from finegrained.heads import register_head
from finegrained.heads.covariance_pooling import CovariancePoolingHead
from finegrained.ops import sparse_inverse_covariance
from finegrained.ops.covariance import batch_trace, safe_normaliser


@register_head("isice", "iSICE")
class ISICEHead(CovariancePoolingHead):
    """iSICE head.

    Args:
        in_channels: C.
        reduction: d after the 1×1 reduction (256); ``None`` keeps C.
        sparsity: λ (0.01). step_size: η (1.0). steps: projected-gradient steps n (5).
        inverse_iterations: Newton–Schulz iterations per inverse (7).
    """
    paper = ('Rahman, Koniusz, Harandi, Wang, Li et al., "Learning Partial Correlation based Deep Visual '
             'Representation for Image Classification", CVPR 2023.')

    def __init__(self, in_channels: int, reduction: Optional[int] = 256, sparsity: float = 0.01,
                 step_size: float = 1.0, steps: int = 5, inverse_iterations: int = 7):
        super().__init__(in_channels, reduction)
        self.sparsity, self.step_size, self.steps = sparsity, step_size, steps
        self.inverse_iterations = inverse_iterations

    def matrix_function(self, sigma: Tensor) -> Tensor:
        c = sigma / safe_normaliser(batch_trace(sigma)).view(-1, 1, 1)
        p = sparse_inverse_covariance(c, self.sparsity, self.step_size, self.steps, self.inverse_iterations)
        return p / safe_normaliser(batch_trace(p)).sqrt().view(-1, 1, 1)
