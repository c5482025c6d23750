"""CBP: compact bilinear pooling by Tensor Sketch or Random Maclaurin features.

Gao, Beijbom, Zhang, Darrell, "Compact Bilinear Pooling", CVPR 2016.

Both variants map each position x_m to a d-dimensional random feature φ(x_m) whose inner products
estimate the bilinear kernel, E⟨φ(x), φ(y)⟩ = ⟨x, y⟩², then average over positions (B-CNN's 1/M),
then sign(z)√(|z| + ε) and l2 as in the paper.

* ``variant="ts"``: Tensor Sketch, φ = FFT⁻¹(FFT(x P₁) ∘ FFT(x P₂)) with two count sketches
  P₁, P₂ drawn once from ``seed`` and stored with the weights (h and s vectors only). Uses
  ``torch.fft``; the old ``torch.rfft`` API that broke earlier ports is not used.
* ``variant="rm"``: Random Maclaurin, φ = (x W₁) ∘ (x W₂)/√d with fixed Rademacher W₁, W₂.

Default d = 8192 (the paper's and the tutorial's table's VGG-16 setting). Projections are not learned
(the paper's fixed variant).

Shapes: (B, C, H, W) -> (B, output_dim).
"""
import torch
import torch.nn.functional as F
from torch import Tensor

from finegrained.heads import PoolingHead, register_head
from finegrained.ops import CountSketches, float32_matrices, random_maclaurin, signed_sqrt


@register_head("cbp", "CBP")
class CompactBilinearHead(PoolingHead):
    """Compact bilinear pooling head.

    Args:
        in_channels: C.
        output_dim: d of the sketch (8192, paper).
        variant: ``"ts"`` (Tensor Sketch) or ``"rm"`` (Random Maclaurin).
        seed: of the fixed random projections.
        eps: inside the signed square root.
    """
    paper = 'Gao, Beijbom, Zhang, Darrell, "Compact Bilinear Pooling", CVPR 2016.'

    def __init__(self, in_channels: int, output_dim: int = 8192, variant: str = "ts", seed: int = 0,
                 eps: float = 1e-5):
        super().__init__()
        if variant not in ("ts", "rm"):
            raise ValueError(f"unknown CBP variant {variant!r}; known: ts (Tensor Sketch), rm (Random Maclaurin)")
        self.variant, self.output_dim, self.eps = variant, output_dim, eps
        if variant == "ts":
            self.sketches = CountSketches(in_channels, output_dim, 2, seed)
        else:
            g = torch.Generator().manual_seed(seed)
            self.register_buffer("w1", torch.randint(2, (in_channels, output_dim), generator=g).float() * 2 - 1)
            self.register_buffer("w2", torch.randint(2, (in_channels, output_dim), generator=g).float() * 2 - 1)

    def features(self, x: Tensor) -> Tensor:
        """The unnormalised compact bilinear feature (B, d)."""
        if self.variant == "ts":
            return self.sketches.sketch(x, orders=2)[0]
        return random_maclaurin(x, self.w1.to(x.dtype), self.w2.to(x.dtype))

    @float32_matrices
    def forward(self, x: Tensor) -> Tensor:
        return F.normalize(signed_sqrt(self.features(x), self.eps), dim=1)
