"""HIHCA: higher-order integration of hierarchical convolutional activations (polynomial kernel pooling).

Cai, Zuo, Zhang, "Higher-order Integration of Hierarchical Convolutional Activations for
Fine-grained Visual Categorization", ICCV 2017.

A degree-r polynomial kernel is approximated by learned rank-one projections, one 1×1 filter bank
U_d (C -> D) per degree, multiplied element-wise and pooled over positions:

    y = (1/M) Σ_m Π_{d=1..r} (U_d x_m)  ->  sign(y)√(|y| + ε)  ->  l2

Hierarchical fusion (the paper, and its code's ``hihca_model_hc.m``): given several maps of the same size
(VGG-16's relu5_2 and relu5_3, ``backbone_layers`` of the classifier), x_m is their concatenation along
channels, each scaled by a learnable scale (initialised 0.5 for the first layers and 1 for the last,
trained at ×10 the head's learning rate, ``parameter_lr_mult``). The projections start from Rademacher
±1/√D (``hihca_setup.m``).

Defaults from the paper: r = 2, D = 8192 filters (the tutorial's table's 9K).

Shapes: (B, C, H, W), or a list of (B, C_i, H, W), -> (B, D).
"""
import math
from typing import List, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from finegrained.heads import PoolingHead, register_head
from finegrained.ops import at_least_float32, signed_sqrt


@register_head("hihca", "HIHCA")
class HIHCAHead(PoolingHead):
    """HIHCA head.

    Args:
        in_channels: C, or one C per fused layer (several layers: learnable layer scales).
        filters: D (8192, paper).
        degree: r (2, paper).
        eps: inside the signed square root.
        seed: of the Rademacher initialisation of the projections.
    """
    paper = ('Cai, Zuo, Zhang, "Higher-order Integration of Hierarchical Convolutional Activations for '
             'Fine-grained Visual Categorization", ICCV 2017.')

    parameter_lr_mult = {"layer_scales": 10.0}

    def __init__(self, in_channels: Union[int, Sequence[int]], filters: int = 8192, degree: int = 2, eps: float = 1e-5,
                 seed: int = 0):
        super().__init__()
        if degree < 1:
            raise ValueError(f"degree must be >= 1, got {degree}")
        channels = [in_channels] if isinstance(in_channels, int) else list(in_channels)
        self.layers = len(channels)
        if self.layers > 1:
            self.layer_scales = nn.Parameter(torch.tensor([0.5] * (len(channels) - 1) + [1.0]))
        self.projections = nn.ModuleList(nn.Conv2d(sum(channels), filters, kernel_size=1, bias=False)
                                         for _ in range(degree))
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for conv in self.projections:
                signs = torch.randint(2, conv.weight.shape, generator=generator, dtype=conv.weight.dtype) * 2 - 1
                conv.weight.copy_(signs / math.sqrt(filters))
        self.eps = eps
        self.output_dim = filters

    def fuse(self, x: Union[Tensor, List[Tensor]]) -> Tensor:
        """One map: itself; several: their concatenation, each times its layer scale."""
        maps = [x] if isinstance(x, Tensor) else list(x)
        if len(maps) != self.layers:
            raise ValueError(f"hihca was built for {self.layers} map(s), got {len(maps)}")
        if self.layers == 1:
            return maps[0]
        return torch.cat([scale * t for scale, t in zip(self.layer_scales, maps)], dim=1)

    def forward(self, x: Union[Tensor, List[Tensor]]) -> Tensor:
        x = self.fuse(x)
        # The projections may run in half precision; their degree-r product overflows fp16 quickly
        # (1e3² > 65,504), so it is formed in float32 (float64 stays float64).
        product = at_least_float32(self.projections[0](x))
        for conv in self.projections[1:]:
            product = product * at_least_float32(conv(x))
        pooled = product.mean(dim=(2, 3))
        return F.normalize(signed_sqrt(pooled, self.eps), dim=1)
