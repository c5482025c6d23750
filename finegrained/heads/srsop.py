"""SR-SOP: the parametric square-root second-order pooling component of GM-SOP.

Wang, Gao, Xie, Zuo, Li, "Global Gated Mixture of Second-order Pooling for Improving Deep
Convolutional Neural Networks", NeurIPS 2018.

    1×1 conv C -> 256, ReLU  ->  1×1 conv 256 -> 128, ReLU  ->  Σ  ->  Σ/tr Σ  ->
    Newton–Schulz, 3 iterations  ->  × √tr Σ  ->  upper triangle

Defaults from the paper: 256 and 128 channels, 3 iterations, giving 128·129/2 = 8,256 values. The
gating branch of GM-SOP uses the same block with BN after each conv (``batch_norm=True``).

Shapes: (B, C, H, W) -> (B, out(out+1)/2).
"""
from torch import Tensor, nn

from finegrained.heads import PoolingHead, register_head
from finegrained.heads.reduction import channel_reduction
from finegrained.ops import covariance, float32_matrices, sqrtm_newton_schulz, triu_vec


@register_head("srsop", "SR-SOP")
class SquareRootSOPHead(PoolingHead):
    """SR-SOP head.

    Args:
        in_channels: C.
        mid_channels: first 1×1 conv (256).
        out_channels: second 1×1 conv, the covariance size d (128).
        iterations: Newton–Schulz iterations (3).
        batch_norm: BN after each conv (GM-SOP's gating branch).
    """
    paper = ('Wang, Gao, Xie, Zuo, Li, "Global Gated Mixture of Second-order Pooling for Improving Deep '
             'Convolutional Neural Networks", NeurIPS 2018 (the component of GM-SOP).')

    def __init__(self, in_channels: int, mid_channels: int = 256, out_channels: int = 128, iterations: int = 3,
                 batch_norm: bool = False):
        super().__init__()
        self.reduce = nn.Sequential(channel_reduction(in_channels, mid_channels, batch_norm),
                                    channel_reduction(mid_channels, out_channels, batch_norm))
        self.iterations = iterations
        self.output_dim = out_channels * (out_channels + 1) // 2

    def forward(self, x: Tensor) -> Tensor:
        return self.pool(self.reduce(x))

    @float32_matrices
    def pool(self, x: Tensor) -> Tensor:
        return triu_vec(sqrtm_newton_schulz(covariance(x), self.iterations))
