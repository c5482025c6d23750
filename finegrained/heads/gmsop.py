"""GM-SOP: global gated mixture of second-order pooling.

Wang, Gao, Xie, Zuo, Li, "Global Gated Mixture of Second-order Pooling for Improving Deep
Convolutional Neural Networks", NeurIPS 2018.

N SR-SOP components M_i (:mod:`finegrained.heads.srsop`) and a sparse gate. The gating branch is its
own SR-SOP block with BN (feature f), followed by noisy top-K gating:

    H_i(f) = W_g f + γ · softplus(W_n f),   γ ~ N(0, 1) per image in training, 0 in evaluation
    ω = softmax over the K largest H_i (0 elsewhere),   output = Σ_i ω_i M_i(X)

and a load-balance loss on the batch importance I = Σ_batch ω,

    L_B = w · (std(I) / mean(I))²     (std with N − 1, MATLAB's std, as the official ``Balance_loss.m``),

exposed as ``head.aux_loss`` after each training forward; :class:`finegrained.model.FineGrainedClassifier`
adds it to the training loss. Defaults from the paper: N = 16, K = 8, w = 100, W_g and W_n
initialised to the constant 1/size ("ones/size"), components of 256 -> 128 channels with 3
Newton–Schulz iterations: 8,256 values. All N components are evaluated and weighted (ω is 0 for the
N − K dropped ones), which keeps the graph static for export.

Tied logits (all of them, at the constant initialisation) are broken at random in training, as the
official gate layer does, and towards the lower index in evaluation and export (:func:`top_k_gates`).

Shapes: (B, C, H, W) -> (B, 8256).
"""
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from finegrained.heads import PoolingHead, register_head
from finegrained.heads.srsop import SquareRootSOPHead
from finegrained.ops import float32_matrices


def load_balance_loss(gates: Tensor, weight: float = 100.0) -> Tensor:
    """w · (std/mean)² of the per-component importance Σ_batch ω; ``gates`` is (B, N).

    The standard deviation divides by N − 1, as MATLAB's ``std`` in the official ``Balance_loss.m`` (GM-SOP
    repository, ``matlab/+dagnn/Balance_loss.m``), whose hand-written derivative is the gradient of this formula.
    A single component has nothing to balance: 0.
    """
    importance = gates.sum(dim=0)
    if importance.numel() < 2:
        return importance.sum() * 0
    return weight * importance.var(correction=1) / importance.mean().square().clamp_min(1e-12)


def top_k_gates(logits: Tensor, k: int, random_ties: bool = False) -> Tensor:
    """(B, N) logits -> (B, N) weights: softmax over the k largest logits per row, 0 elsewhere.

    Ties (with the paper's constant initialisation every logit is equal) are broken by lowering the
    logits used for selection by 10⁻⁶·(1 + max|logit|)·rank; the softmax uses the unmodified logits.

    * ``random_ties=False`` (evaluation, export): rank = index, ties go to the lower index, so that
      exported models pick the same components as PyTorch (top-k's tie order is unspecified, and a
      stable sort does not export to ONNX).
    * ``random_ties=True`` (training): rank = a random permutation per row, ties go to random
      components, as the official gate layer picks tied top-K entries at random; otherwise half of
      the components would never be selected from the constant initialisation.
    """
    n = logits.shape[1]
    if random_ties:
        ramp = torch.rand(logits.shape, device=logits.device).argsort(dim=1).to(logits.dtype)
    else:
        ramp = torch.arange(n, device=logits.device, dtype=logits.dtype)
    tie_break = 1e-6 * (1 + logits.detach().abs().amax(dim=1, keepdim=True)) * ramp
    indices = (logits - tie_break).topk(k, dim=1).indices
    values = logits.gather(1, indices)
    return torch.zeros_like(logits).scatter(1, indices, values.softmax(dim=1))


@register_head("gmsop", "GM-SOP")
class GatedMixtureSOPHead(PoolingHead):
    """GM-SOP head.

    Args:
        in_channels: C.
        components: N (16).
        top_k: K kept per image (8).
        balance_weight: w of the load-balance loss (100).
        mid_channels: channels after every SR-SOP block's first convolution (256).
        out_channels: channels after its second convolution (128): 8,256 values.
        iterations: its Newton–Schulz iterations (3).
    """
    paper = ('Wang, Gao, Xie, Zuo, Li, "Global Gated Mixture of Second-order Pooling for Improving Deep '
             'Convolutional Neural Networks", NeurIPS 2018.')

    def __init__(self, in_channels: int, components: int = 16, top_k: int = 8, balance_weight: float = 100.0,
                 mid_channels: int = 256, out_channels: int = 128, iterations: int = 3):
        super().__init__()
        if not 1 <= top_k <= components:
            raise ValueError(f"top_k must be in 1..components={components}, got {top_k}")
        block = dict(mid_channels=mid_channels, out_channels=out_channels, iterations=iterations)
        self.experts = nn.ModuleList(SquareRootSOPHead(in_channels, **block) for _ in range(components))
        self.gate_features = SquareRootSOPHead(in_channels, batch_norm=True, **block)
        size = self.gate_features.output_dim
        self.gate = nn.Linear(size, components, bias=False)
        self.noise = nn.Linear(size, components, bias=False)
        for layer in (self.gate, self.noise):
            nn.init.constant_(layer.weight, 1.0 / size)
        self.top_k, self.balance_weight = top_k, balance_weight
        self.output_dim = self.experts[0].output_dim
        self.last_gates: Optional[Tensor] = None

    @float32_matrices
    def gates(self, x: Tensor) -> Tensor:
        # In float32 even under autocast: bf16 logits round near-ties together, and which
        # components are kept must not depend on the precision of the backbone.
        f = self.gate_features(x)
        logits = self.gate(f)
        if self.training:
            gamma = torch.randn(x.shape[0], 1, dtype=logits.dtype, device=logits.device)
            logits = logits + gamma * F.softplus(self.noise(f))
        return top_k_gates(logits, self.top_k, random_ties=self.training)

    def forward(self, x: Tensor) -> Tensor:
        gates = self.gates(x)  # (B, N)
        outputs = torch.stack([expert(x) for expert in self.experts], dim=1)  # (B, N, D)
        self.last_gates = gates.detach()
        self.aux_loss = load_balance_loss(gates, self.balance_weight) if self.training else None
        return (gates.unsqueeze(-1) * outputs).sum(dim=1)
