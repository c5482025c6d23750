"""NetVLAD: trainable VLAD pooling of local features.

Arandjelović, Gronat, Torii, Pajdla, Sivic, "NetVLAD: CNN architecture for weakly supervised place
recognition", CVPR 2016.

    x̂_m = x_m/‖x_m‖,  a_k(x̂) = softmax_k(w_kᵀx̂ + b_k),  w_k = 2α·c_k,  b_k = −α‖c_k‖²
    V(:, k) = Σ_m a_k(x̂_m)(x̂_m − c_k)  ->  l2 per cluster (intra-normalisation)  ->  l2

Defaults: K = 64 clusters (paper; 512 × 64 = 32,768 values on VGG-16, the tutorial's table's 32K).
:meth:`NetVLADHead.init_centroids` (the data-dependent initialisation) sets c by k-means on
l2-normalised descriptors (scikit-learn) and α from the data by the official rule for these weights (the
``vladv2`` branch of ``addLayers.m``, Relja/netvlad): α = −log(0.01) / mean(d₂² − d₁²), with d₁² ≤ d₂² the
squared distances of a descriptor to its two nearest centres. The assignment logits 2αc_kᵀx̂ − α‖c_k‖² equal
−α‖x̂ − c_k‖² up to a term common to all k, so the nearest centre's weight is exp(α(d₂² − d₁²)) times the
second's: 100 times, in the mean of the exponent. Then w and b. Until then centres start random on the unit
sphere with α = ``alpha`` (100).

Shapes: (B, C, H, W) -> (B, K·C).
"""
import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from finegrained.heads import PoolingHead, register_head
from finegrained.heads.base import local_descriptors
from finegrained.ops import float32_matrices


@register_head("netvlad", "NetVLAD")
class NetVLADHead(PoolingHead):
    """NetVLAD head.

    Args:
        in_channels: C.
        clusters: K (64, paper).
        alpha: assignment sharpness α before the data-dependent initialisation (100).
        alpha_from_data: set α from the descriptors in :meth:`init_centroids` (the official code).
    """
    paper = ('Arandjelović, Gronat, Torii, Pajdla, Sivic, "NetVLAD: CNN architecture for weakly supervised place '
             'recognition", CVPR 2016.')

    def __init__(self, in_channels: int, clusters: int = 64, alpha: float = 100.0, alpha_from_data: bool = True):
        super().__init__()
        self.clusters, self.alpha, self.alpha_from_data = clusters, alpha, alpha_from_data
        self.centroids = nn.Parameter(F.normalize(torch.randn(clusters, in_channels), dim=1))
        self.assign = nn.Conv2d(in_channels, clusters, kernel_size=1, bias=True)
        self._tie_assignment_to_centroids()
        self.output_dim = clusters * in_channels

    @torch.no_grad()
    def _tie_assignment_to_centroids(self):
        self.assign.weight.copy_((2 * self.alpha * self.centroids)[:, :, None, None])
        self.assign.bias.copy_(-self.alpha * self.centroids.pow(2).sum(1))

    @torch.no_grad()
    def init_centroids(self, features: Tensor, seed: int = 0, max_descriptors: Optional[int] = 50000) -> int:
        """k-means (scikit-learn) on l2-normalised local descriptors of ``features`` (B, C, H, W) or (N, C).

        Returns the number of descriptors clustered (at most ``max_descriptors``, sampled with ``seed``).
        """
        from sklearn.cluster import KMeans

        rows = local_descriptors(features, max_descriptors, seed)
        descriptors = F.normalize(rows.detach().double(), dim=1).cpu().numpy()
        if len(descriptors) < self.clusters:
            raise ValueError(f"k-means needs at least {self.clusters} descriptors, got {len(descriptors)}")
        kmeans = KMeans(n_clusters=self.clusters, n_init=3, random_state=seed).fit(descriptors)
        centres = torch.as_tensor(kmeans.cluster_centers_)
        if self.alpha_from_data:
            squared = torch.cdist(torch.as_tensor(descriptors), centres).square()  # (N, K)
            nearest = squared.topk(2, dim=1, largest=False).values  # d₁², d₂² per descriptor
            gap = float((nearest[:, 1] - nearest[:, 0]).mean())
            self.alpha = -math.log(0.01) / max(gap, torch.finfo(torch.float64).eps)
        self.centroids.copy_(centres.to(self.centroids.dtype))
        self._tie_assignment_to_centroids()
        return len(descriptors)

    def init_from_features(self, features: Tensor, seed: int = 0) -> str:
        used = self.init_centroids(features, seed)
        return (f"netvlad: k-means ({self.clusters} centres) on {used:,} l2-normalised local descriptors, "
                f"alpha {self.alpha:.4g}")

    @float32_matrices
    def forward(self, x: Tensor) -> Tensor:
        x = F.normalize(x, dim=1)
        assignment = self.assign(x).flatten(2).softmax(dim=1)  # (B, K, M)
        positions = x.flatten(2)  # (B, C, M)
        # Σ_m a_k(x_m)(x_m − c_k) = (A Xᵀ)_k − (Σ_m a_k) c_k, without a (B, K, C, M) tensor.
        vlad = assignment @ positions.transpose(1, 2) - assignment.sum(-1, keepdim=True) * self.centroids
        vlad = F.normalize(vlad, dim=2)
        return F.normalize(vlad.flatten(1), dim=1)
