"""KP: kernel pooling with a learnable Taylor-series kernel.

Cui, Zhou, Wang, Liu, Lin, Belongie, "Kernel Pooling for Convolutional Neural Networks", CVPR 2017.

    φ(X) = [α₀, α₁·x̄, α₂·TS₂(X), …, α_p·TS_p(X)]  ->  sign(z)√(|z| + ε)  ->  l2

x̄ is the mean feature and TS_k the order-k Tensor Sketch averaged over positions (cumulative FFT
products of k count sketches of dimension d). The α_i are learned, initialised from the Taylor
series of a Gaussian RBF kernel exp(−γ‖x − y‖²) on unit vectors: α_i² = e^{−2γ}(2γ)^i / i!.

Defaults: p = 4 (the paper: order 4 suffices to approximate a Gaussian RBF kernel), d = 4096 per
order ≥ 2 (paper), γ = 1 (weights e^{−2}·2^i/i! spread evenly over the orders; the paper tunes γ per
dataset — pass ``gamma``). Output 1 + C + (p − 1)·d: 12,801 for VGG-16 (C = 512), 14,337 for
ResNet-50 (C = 2048) — the tutorial's table's 13K and 14K.

Shapes: (B, C, H, W) -> (B, 1 + C + (p − 1)·d).
"""
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from finegrained.heads import PoolingHead, register_head
from finegrained.ops import CountSketches, float32_matrices, signed_sqrt


def rbf_taylor_weights(order: int, gamma: float) -> Tensor:
    """α_i = √(e^{−2γ}(2γ)^i / i!), i = 0..order."""
    return torch.tensor([math.sqrt(math.exp(-2 * gamma) * (2 * gamma) ** i / math.factorial(i))
                         for i in range(order + 1)])


@register_head("kp", "KP")
class KernelPoolingHead(PoolingHead):
    """Kernel pooling head.

    Args:
        in_channels: C.
        order: p ≥ 2 (4, paper).
        sketch_dim: d per order ≥ 2 (4096, paper).
        gamma: RBF bandwidth used to initialise α.
        seed: of the fixed count sketches.
        eps: inside the signed square root.
    """
    paper = 'Cui, Zhou, Wang, Liu, Lin, Belongie, "Kernel Pooling for Convolutional Neural Networks", CVPR 2017.'

    def __init__(self, in_channels: int, order: int = 4, sketch_dim: int = 4096, gamma: float = 1.0,
                 seed: int = 0, eps: float = 1e-5):
        super().__init__()
        if order < 2:
            raise ValueError(f"kernel pooling needs order >= 2, got {order}")
        self.order, self.eps = order, eps
        self.sketches = CountSketches(in_channels, sketch_dim, order, seed)
        self.alpha = nn.Parameter(rbf_taylor_weights(order, gamma))
        self.output_dim = 1 + in_channels + (order - 1) * sketch_dim

    @float32_matrices
    def forward(self, x: Tensor) -> Tensor:
        terms = [self.alpha[0].expand(x.shape[0], 1), self.alpha[1] * x.mean(dim=(2, 3))]
        sketches = self.sketches.sketch(x, orders=self.order)
        terms += [self.alpha[k + 2] * ts for k, ts in enumerate(sketches)]
        return F.normalize(signed_sqrt(torch.cat(terms, dim=1), self.eps), dim=1)
