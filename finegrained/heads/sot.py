"""SoT: multi-headed global cross-covariance pooling (MGCrP) of visual tokens, fused with the class token.

Xie, Zeng, Long, Li, Wang, "SoT: Delving Deeper into Classification Head for Transformer", 2021
(code: jiangtaoxie/SoT).

    tokens V (B, N, D) --linear D -> 2·h·r, no bias--> Q, K (B·h, N, r), each minus its one mean
    --> P = QᵀK / N (B·h, r, r) --svPN--> (B, h·r²) --Dropout--> z

Q and K are centred by one scalar per (sample, head), the mean over all N·r entries, as in the official
code. With a backbone that has a class token (ViT, DeiT, EVA), the output is [z, class token]
(B, h·r² + D): the linear classifier after it computes visual_fc(z) + cls_fc(cls), which is SoT's
published ``sum_fc`` fusion (a linear map of a concatenation is the sum of the two linear maps; the two
biases add into one). Without a class token (CNNs, Swin), the tokens are the map's H·W positions and the
output is z alone, as SoT's visual-tokens-only classifier.

Defaults are SoT-Small's: h = 6, r = 24 (3,456 values), Dropout 0.5, α = ½; linear layers start from a
truncated normal with std 0.02 (the classifier too, see ``classifier_init_std``), w from N(0, 1).

Shapes: (B, D, H, W) [and (B, D) class token] -> (B, h·r² [+ D]).
"""
from __future__ import annotations

from typing import Tuple, Union

import torch
from torch import Tensor, nn

from finegrained.heads import register_head
from finegrained.heads.base import PoolingHead
from finegrained.ops import sv_power_normalise
from finegrained.ops.precision import full_precision


def cross_covariance_heads(tokens: Tensor, projection: nn.Linear, heads: int, rank: int) -> Tensor:
    """(B, N, D) tokens -> (B·h, r, r) cross-covariances QᵀK/N of the h heads (scalar-centred Q and K)."""
    b, n, _ = tokens.shape
    qk = projection(tokens).view(b, n, 2, heads, rank)
    q, k = (qk[:, :, i].permute(0, 2, 1, 3).reshape(b * heads, n, rank) for i in (0, 1))
    return _centred_cross_covariance(q, k)


@full_precision
def _centred_cross_covariance(q: Tensor, k: Tensor) -> Tensor:
    k = k.to(q.dtype)
    q = q - q.mean(dim=(1, 2), keepdim=True)
    k = k - k.mean(dim=(1, 2), keepdim=True)
    return torch.bmm(q.transpose(1, 2), k) / q.shape[1]


@register_head("sot", "SoT")
class SoTHead(PoolingHead):
    """SoT head.

    Args:
        in_channels: D of the tokens (the backbone's channels).
        class_token_dim: D of the backbone's class token, 0 for none (set by the model from the backbone).
        heads: h (6).
        rank: r, the size of each head's matrix (24).
        dropout: on z in training (0.5 for SoT-Small).
        alpha: svPN's power (½).
    """
    paper = ('Xie, Zeng, Long, Li, Wang, "SoT: Delving Deeper into Classification Head for Transformer", 2021 '
             "(arXiv 2104.10935).")

    uses_class_token = True
    classifier_init_std = 0.02

    def __init__(self, in_channels: int, class_token_dim: int = 0, heads: int = 6, rank: int = 24,
                 dropout: float = 0.5, alpha: float = 0.5):
        super().__init__()
        self.heads, self.rank, self.alpha, self.class_token_dim = heads, rank, alpha, class_token_dim
        self.projection = nn.Linear(in_channels, 2 * heads * rank, bias=False)
        nn.init.trunc_normal_(self.projection.weight, std=0.02)
        self.start = nn.Parameter(torch.randn(rank))
        self.dropout = nn.Dropout(dropout) if dropout else nn.Identity()
        self.output_dim = heads * rank * rank + class_token_dim

    def forward(self, x: Union[Tensor, Tuple[Tensor, Tensor]]) -> Tensor:
        feature_map, class_token = x if isinstance(x, tuple) else (x, None)
        if (class_token is None) != (self.class_token_dim == 0):
            raise ValueError(f"SoT head built for class_token_dim={self.class_token_dim} received "
                             f"{'no class token' if class_token is None else 'a class token'}")
        tokens = feature_map.flatten(2).transpose(1, 2)
        p = cross_covariance_heads(tokens, self.projection, self.heads, self.rank)
        z = sv_power_normalise(p, self.start, self.alpha).reshape(len(tokens), -1)
        z = self.dropout(z)
        if class_token is None:
            return z
        return torch.cat([z, class_token.to(z.dtype)], dim=1)
