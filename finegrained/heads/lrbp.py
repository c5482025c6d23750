"""LRBP: low-rank bilinear pooling, a bilinear classifier with low-rank class weights.

Kong & Fowlkes, "Low-rank Bilinear Pooling for Fine-Grained Classification", CVPR 2017.

After a shared 1×1 reduction P (C -> m), class k scores the bilinear feature with a rank-r matrix
W_k = U_k U_kᵀ − V_k V_kᵀ (U_k, V_k: m × r/2), without ever forming the m×m feature:

    score_k = tr(W_k Y Yᵀ) + b_k = ‖U_kᵀ Y‖²_F − ‖V_kᵀ Y‖²_F + b_k,    Y = P X (m × M)

summed over the M positions as in the paper and its code (``bisvm_posneg_UUreg_forward.m``);
``positions="mean"`` divides by M. This head is the classifier (``produces_logits``): it takes
``num_classes`` and its output is the logits. Defaults from the paper and its code: m = 100 (the tutorial
table's 10K = 100² equivalent dimension), rank r = 8, U_k and V_k from 0.01·N(0, 1), P set by PCA
(:meth:`LowRankBilinearHead.init_reduction`, the data-dependent initialisation) and then frozen
(``freeze_reduction``).

Shapes: (B, C, H, W) -> (B, num_classes).
"""
from typing import Optional

import numpy as np
import torch
from torch import Tensor, nn

from finegrained.heads import PoolingHead, register_head
from finegrained.heads.base import local_descriptors
from finegrained.ops import float32_matrices


@register_head("lrbp", "LRBP")
class LowRankBilinearHead(PoolingHead):
    """LRBP head (the classifier itself).

    Args:
        in_channels: C.
        num_classes: K.
        reduction: m (100, paper).
        rank: r, even; U_k and V_k have r/2 columns each (8, paper).
        freeze_reduction: keep P at its data-dependent initialisation (the official code).
        positions: ``"sum"`` (paper) or ``"mean"`` over the positions.
    """
    paper = 'Kong, Fowlkes, "Low-rank Bilinear Pooling for Fine-Grained Classification", CVPR 2017.'

    produces_logits = True

    def __init__(self, in_channels: int, num_classes: int, reduction: int = 100, rank: int = 8,
                 freeze_reduction: bool = True, positions: str = "sum"):
        super().__init__()
        if rank < 2 or rank % 2:
            raise ValueError(f"rank must be an even number >= 2 (U and V get rank/2 columns), got {rank}")
        if positions not in ("sum", "mean"):
            raise ValueError(f"positions must be 'sum' or 'mean', got {positions!r}")
        self.num_classes, self.half_rank, self.positions = num_classes, rank // 2, positions
        self.reduce = nn.Conv2d(in_channels, reduction, kernel_size=1, bias=True)
        self.reduce.requires_grad_(not freeze_reduction)
        self.project = nn.Conv2d(reduction, num_classes * rank, kernel_size=1, bias=False)
        nn.init.normal_(self.project.weight, std=0.01)
        self.bias = nn.Parameter(torch.zeros(num_classes))
        self.output_dim = num_classes

    @torch.no_grad()
    def init_reduction(self, features: Tensor, seed: int = 0, max_descriptors: Optional[int] = 100000) -> int:
        """PCA (scikit-learn) of the local features (B, C, H, W) or (N, C): P = principal axes, bias = −P·mean.

        Returns the number of descriptors the PCA was fitted on (at most ``max_descriptors``, drawn with ``seed``).
        """
        from sklearn.decomposition import PCA

        rows = local_descriptors(features, max_descriptors, seed).detach().double().cpu().numpy()
        m = self.reduce.out_channels
        if rows.shape[0] < m:
            raise ValueError(f"PCA to {m} dimensions needs at least {m} descriptors, got {rows.shape[0]}")
        pca = PCA(n_components=m, random_state=seed).fit(rows)
        axes = torch.as_tensor(pca.components_, dtype=self.reduce.weight.dtype)
        self.reduce.weight.copy_(axes[:, :, None, None])
        self.reduce.bias.copy_(-axes @ torch.as_tensor(np.asarray(pca.mean_), dtype=axes.dtype))
        return rows.shape[0]

    def init_from_features(self, features: Tensor, seed: int = 0) -> str:
        used = self.init_reduction(features, seed)
        return f"lrbp: PCA to {self.reduce.out_channels} channels on {used:,} local descriptors"

    @float32_matrices
    def forward(self, x: Tensor) -> Tensor:
        y = self.project(self.reduce(x)).flatten(2)  # (B, K·r, M)
        squares = y.square()
        energy = (squares.sum(-1) if self.positions == "sum" else squares.mean(-1))
        energy = energy.view(x.shape[0], self.num_classes, 2, self.half_rank).sum(-1)
        return energy[:, :, 0] - energy[:, :, 1] + self.bias
