"""CBP: compact bilinear pooling by Tensor Sketch or Random Maclaurin features.

Gao, Beijbom, Zhang, Darrell, "Compact Bilinear Pooling", CVPR 2016.

Both variants map each position x_m to a d-dimensional random feature φ(x_m) whose inner products
estimate the bilinear kernel, E⟨φ(x), φ(y)⟩ = ⟨x, y⟩², then average over positions (B-CNN's 1/M),
then sign(z)√(|z| + ε) and l2 as in the paper.

* ``variant="ts"``: Tensor Sketch, φ = FFT⁻¹(FFT(x P₁) ∘ FFT(x P₂)) with two count sketches
  P₁, P₂ drawn once from ``seed`` and stored with the weights (h and s vectors only). Uses
  ``torch.fft``; the old ``torch.rfft`` API that broke earlier ports is not used.
* ``variant="rm"``: Random Maclaurin, φ = (x W₁) ∘ (x W₂)/√d with fixed Rademacher W₁, W₂.

Default d = 8192 (the paper's and the seed table's VGG-16 setting). Projections are not learned
(the paper's fixed variant).

Shapes: (B, C, H, W) -> (B, output_dim).
"""
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from finegrained.heads import register_head
from finegrained.heads._precision import float32_matrices
from finegrained.linalg import random_maclaurin, signed_sqrt, tensor_sketch, tensor_sketch_gram, tensor_sketch_hashed


class CountSketches(nn.Module):
    """``n`` fixed count sketches C -> d, stored compactly as (h, s) and expanded on use."""

    def __init__(self, in_channels: int, out_dim: int, n: int, seed: int):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.out_dim = out_dim
        self.register_buffer("hashes", torch.randint(out_dim, (n, in_channels), generator=g))
        self.register_buffer("signs", torch.randint(2, (n, in_channels), generator=g).float() * 2 - 1)

    def matrices(self, dtype: torch.dtype):
        """list of n dense (C, d) matrices (one-hot rows times signs: one matmul per sketch)."""
        dense = F.one_hot(self.hashes, self.out_dim).to(dtype) * self.signs.to(dtype).unsqueeze(-1)
        return list(dense.unbind(0))

    def sketch(self, x: Tensor, orders: int):
        """[TS_2, …, TS_orders] of ``x`` (B, C, H, W).

        Eager PyTorch scatters: order 2 (CBP) from the Gram matrix without any FFT, higher orders
        (KP) by hashed count sketches and FFTs. Exports use the dense matrices, because ONNX has no
        index_add and a matmul exports everywhere.
        """
        if torch.jit.is_tracing() or torch.onnx.is_in_onnx_export() or torch.compiler.is_compiling():
            return tensor_sketch(x, self.matrices(x.dtype), orders=orders)
        if orders == 2:  # CBP: from the Gram matrix, no FFT (same values)
            return [tensor_sketch_gram(x, self.hashes, self.signs, self.out_dim)]
        return tensor_sketch_hashed(x, self.hashes, self.signs, self.out_dim, orders=orders)


@register_head("cbp")
class CompactBilinearHead(nn.Module):
    """Args:
        in_channels: C.
        output_dim: d of the sketch (8192, paper).
        variant: ``"ts"`` (Tensor Sketch) or ``"rm"`` (Random Maclaurin).
        seed: of the fixed random projections.
        eps: inside the signed square root.
    """

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
