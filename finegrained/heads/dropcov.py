"""DropCov: adaptive channel dropout before global covariance pooling.

Wang, Gao, Li, Zuo, Li et al., "DropCov: A Simple yet Effective Method for Improving Deep Architectures",
NeurIPS 2022 (code: mingzeG/DropCov).

    1×1 reduction (C -> d = 256, BN, ReLU) -> X
    training:   ω = softmax_c(ECA(GAP(X)))      (Conv1d k = 3 over channels, no bias)
                X′ = X ⊙ (1 + ω)
                p = clamp(1 − (10 / log₂ d) · mean_b cos(ω_b, Σ(X′_b)·1), 0, 1)   (one rate per batch, no gradient)
                Y = channel dropout of X′ at rate p (whole channels per sample, kept ones × 1/(1 − p))
                z = triu(Σ(Y))
    evaluation: z = triu(Σ(X))                   (no ECA, no rescaling, no dropout)

No post-normalisation (no square root, signed square root or ℓ2): the official head has none.

Shapes: (B, C, H, W) -> (B, d(d+1)/2); 32,896 for d = 256.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from finegrained.heads import register_head
from finegrained.heads.covariance_pooling import CovariancePoolingHead
from finegrained.ops import covariance

RATE_CONSTANT = 10.0


@register_head("dropcov", "DropCov")
class DropCovHead(CovariancePoolingHead):
    """DropCov head.

    Args:
        in_channels: C.
        reduction: d after the 1×1 reduction (256); ``None`` keeps C.
        kernel_size: of the ECA Conv1d (3).
    """
    paper = ('Wang, Gao, Li, Zuo, Li, "DropCov: A Simple yet Effective Method for Improving Deep Architectures", '
             "NeurIPS 2022.")

    def __init__(self, in_channels: int, reduction: Optional[int] = 256, kernel_size: int = 3):
        super().__init__(in_channels, reduction)
        # PyTorch's default initialisation, as the official code leaves the ECA conv.
        self.attention = nn.Conv1d(1, 1, kernel_size, padding=kernel_size // 2, bias=False)
        self.rate_factor = RATE_CONSTANT / math.log2(self.dim)
        self.last_drop_rate: Optional[Tensor] = None  # p of the last training batch

    def channel_weights(self, x: Tensor) -> Tensor:
        """(B, d, H, W) -> ω (B, d): softmax over channels of the ECA response to the pooled features."""
        pooled = x.mean(dim=(2, 3)).unsqueeze(1)
        return torch.softmax(self.attention(pooled.to(self.attention.weight.dtype)).squeeze(1).to(x.dtype), dim=1)

    def drop_rate(self, weights: Tensor, scaled: Tensor) -> Tensor:
        """p = clamp(1 − (10/log₂ d)·mean cos(ω, Σ·1), 0, 1), detached, as a 0-d tensor (no host sync)."""
        row_sums = covariance(scaled).sum(dim=2)
        cosine = F.cosine_similarity(weights, row_sums, dim=1)
        return (1.0 - self.rate_factor * cosine.mean()).clamp(0.0, 1.0).detach()

    def normalised_covariance(self, x: Tensor) -> Tensor:
        if not self.training:
            return covariance(x)
        weights = self.channel_weights(x)
        scaled = x * (1.0 + weights)[:, :, None, None]
        p = self.drop_rate(weights, scaled)
        self.last_drop_rate = p
        # Dropout2d with a tensor rate: the same Bernoulli mask per (sample, channel), without .item().
        keep = 1.0 - p
        mask = torch.bernoulli(keep.expand(x.shape[0], x.shape[1], 1, 1).to(x.dtype))
        dropped = scaled * mask / keep.clamp_min(torch.finfo(x.dtype).tiny)
        return covariance(dropped)
