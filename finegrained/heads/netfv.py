"""NetFV: a trainable Fisher-vector pooling (the "simple NetFV" of the NetVLAD line of work).

Following Arandjelović et al. (CVPR 2016) and the learnable-pooling NetFV of Miech, Laptev, Sivic
("Learnable pooling with Context Gating", 2017), with soft assignment a_k(x) = softmax_k(w_kᵀx + b_k),
learned means μ_k and learned diagonal scales σ_k = s_k² + 10⁻⁶ (squared to stay positive):

    F₁(:, k) = (1/M) Σ_m a_k(x_m) (x_m − μ_k) / σ_k
    F₂(:, k) = (1/M) Σ_m a_k(x_m) (x_m − μ_k)² / σ_k²
    -> l2 of F₁, l2 of F₂ (each over all K·C values) -> concatenate -> l2

Default K = 64 clusters (the NetVLAD setting; the tutorial's table lists NetFV without a dimension).

Shapes: (B, C, H, W) -> (B, 2·K·C).
"""
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from finegrained.heads import PoolingHead, register_head
from finegrained.ops import float32_matrices


@register_head("netfv", "NetFV")
class NetFVHead(PoolingHead):
    """NetFV head.

    Args:
        in_channels: C.
        clusters: K (64).
    """
    paper = ('Arandjelović et al., CVPR 2016 (the NetVLAD line of work) and Miech, Laptev, Sivic, "Learnable '
             'pooling with Context Gating for video classification", 2017 (the learnable NetFV).')

    def __init__(self, in_channels: int, clusters: int = 64):
        super().__init__()
        self.assign = nn.Conv2d(in_channels, clusters, kernel_size=1, bias=True)
        self.means = nn.Parameter(0.1 * torch.randn(clusters, in_channels))
        self.scales = nn.Parameter(torch.ones(clusters, in_channels))
        self.output_dim = 2 * clusters * in_channels

    @float32_matrices
    def forward(self, x: Tensor) -> Tensor:
        m = x.shape[2] * x.shape[3]
        a = self.assign(x).flatten(2).softmax(dim=1)  # (B, K, M)
        positions = x.flatten(2).transpose(1, 2)  # (B, M, C)
        mass = a.sum(-1, keepdim=True)  # (B, K, 1)
        first_moment = a @ positions  # Σ_m a x_m
        second_moment = a @ positions.square()  # Σ_m a x_m²
        mu = self.means
        sigma = self.scales.square() + 1e-6
        # Expanded sums avoid a (B, K, M, C) tensor of residuals.
        first = (first_moment - mass * mu) / sigma / m
        second = (second_moment - 2 * mu * first_moment + mass * mu.square()) / sigma.square() / m
        parts = [F.normalize(t.flatten(1), dim=1) for t in (first, second)]
        return F.normalize(torch.cat(parts, dim=1), dim=1)
