"""Global average pooling: the first-order baseline of every table.

Used by Inception, ResNet and DenseNet (Lin, Chen, Yan, "Network In Network", ICLR 2014).
Shapes: (B, C, H, W) -> (B, C).
"""
from torch import Tensor

from finegrained.heads import PoolingHead, register_head


@register_head("gap", "GAP")
class GlobalAvgPoolHead(PoolingHead):
    """Mean over positions.

    Args:
        in_channels: C, which is also ``output_dim``.
    """
    paper = 'Lin, Chen, Yan, "Network In Network", ICLR 2014 (the first-order baseline of every table).'

    def __init__(self, in_channels: int):
        super().__init__()
        self.output_dim = in_channels

    def forward(self, x: Tensor) -> Tensor:
        return x.mean(dim=(2, 3))
