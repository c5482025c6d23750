"""HIHCA: higher-order integration of hierarchical convolutional activations (polynomial kernel pooling).

Cai, Zuo, Zhang, "Higher-order Integration of Hierarchical Convolutional Activations for
Fine-grained Visual Categorization", ICCV 2017.

A degree-r polynomial kernel is approximated by learned rank-one projections, one 1×1 filter bank
U_d (C -> D) per degree, multiplied element-wise and pooled over positions:

    y = (1/M) Σ_m Π_{d=1..r} (U_d x_m)  ->  sign(y)√(|y| + ε)  ->  l2

Defaults from the paper: r = 2, D = 8192 filters (the seed table's 9K). The paper also fuses two
layers (relu5_2 and relu5_3); this head pools the single map it is given.

Shapes: (B, C, H, W) -> (B, D).
"""
import math

import torch.nn.functional as F
from torch import Tensor, nn

from finegrained.heads import PoolingHead, register_head
from finegrained.ops import at_least_float32, signed_sqrt


@register_head("hihca", "HIHCA")
class HIHCAHead(PoolingHead):
    """Args:
        in_channels: C.
        filters: D (8192, paper).
        degree: r (2, paper).
        eps: inside the signed square root.
    """

    def __init__(self, in_channels: int, filters: int = 8192, degree: int = 2, eps: float = 1e-5):
        super().__init__()
        if degree < 1:
            raise ValueError(f"degree must be >= 1, got {degree}")
        self.projections = nn.ModuleList(nn.Conv2d(in_channels, filters, kernel_size=1, bias=False)
                                         for _ in range(degree))
        for conv in self.projections:
            nn.init.normal_(conv.weight, std=1 / math.sqrt(in_channels))
        self.eps = eps
        self.output_dim = filters

    def forward(self, x: Tensor) -> Tensor:
        # The projections may run in half precision; their degree-r product overflows fp16 quickly
        # (1e3² > 65,504), so it is formed in float32 (float64 stays float64).
        product = at_least_float32(self.projections[0](x))
        for conv in self.projections[1:]:
            product = product * at_least_float32(conv(x))
        pooled = product.mean(dim=(2, 3))
        return F.normalize(signed_sqrt(pooled, self.eps), dim=1)
