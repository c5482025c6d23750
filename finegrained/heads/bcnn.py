"""B-CNN: bilinear pooling with signed square root and l2 normalisation.

Lin, RoyChowdhury, Maji, "Bilinear CNN Models for Fine-grained Visual Recognition", ICCV 2015.
The symmetric (single-stream) form: G = (1/M)·X·Xᵀ (uncentred), all C² entries,
then sign(g)·√(|g| + ε) and l2. VGG-16 relu5_3 gives 512² = 262,144 values.

Shapes: (B, C, H, W) -> (B, C²).
"""
import torch.nn.functional as F
from torch import Tensor

from finegrained.heads import PoolingHead, register_head
from finegrained.ops import float32_matrices, gram, signed_sqrt


@register_head("bcnn", "B-CNN")
class BCNNHead(PoolingHead):
    """B-CNN head.

    Args:
        in_channels: C.
        eps: ε of the signed square root sign(g)√(|g| + ε); inside the root, so the gradient is finite at 0.
    """
    paper = 'Lin, RoyChowdhury, Maji, "Bilinear CNN Models for Fine-grained Visual Recognition", ICCV 2015.'

    def __init__(self, in_channels: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.output_dim = in_channels * in_channels

    @float32_matrices
    def forward(self, x: Tensor) -> Tensor:
        g = gram(x).flatten(1)
        return F.normalize(signed_sqrt(g, self.eps), dim=1)
