"""Random feature maps of polynomial kernels: count sketches, Tensor Sketch, Random Maclaurin.

* :func:`count_sketch_matrix`, :func:`count_sketch`, :func:`tensor_sketch`,
  :func:`tensor_sketch_hashed`, :func:`tensor_sketch_gram`, :func:`random_maclaurin` -- the random
  feature maps of compact bilinear pooling (Gao, Beijbom, Zhang, Darrell, CVPR 2016) and kernel
  pooling (Cui et al., CVPR 2017).
* :class:`CountSketches` -- ``n`` fixed count sketches stored as (hash, sign) buffers, with the
  fastest exact sketch for eager PyTorch and an exportable one for ONNX.

Shapes: features (B, C, H, W) or (B, C, M); sketches (B, d).
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from finegrained.ops.covariance import positions, gram
from finegrained.ops.precision import full_precision


def count_sketch_matrix(in_dim: int, out_dim: int, generator: torch.Generator) -> Tensor:
    """Dense (in_dim, out_dim) count-sketch matrix: row c has a single sign s(c) = ±1 at column h(c).

    A dense matrix turns the sketch into one matmul (fast on GPUs, exportable to ONNX).
    """
    h = torch.randint(out_dim, (in_dim,), generator=generator)
    s = torch.randint(2, (in_dim,), generator=generator).float() * 2 - 1
    sketch = torch.zeros(in_dim, out_dim)
    sketch[torch.arange(in_dim), h] = s
    return sketch


@full_precision
def tensor_sketch(x: Tensor, sketches: Sequence[Tensor], orders: int = 2):
    """Tensor Sketch of the order-k self tensor products of every position, averaged over positions.

    TS_k(x) = FFT⁻¹(Π_{i ≤ k} FFT(x P_i)) estimates x^{⊗k} without bias:
    E⟨TS_k(x), TS_k(y)⟩ = ⟨x, y⟩^k (Pham & Pagh, KDD 2013; Gao et al., CVPR 2016).
    Products of FFTs are shared across orders, as in kernel pooling (Cui et al., CVPR 2017).

    Args:
        x: (B, C, H, W) or (B, C, M) features.
        sketches: sequence of at least ``orders`` count-sketch matrices (C, d).
        orders: highest order k ≥ 2.
    Returns:
        list of (B, d) tensors [TS_2, …, TS_orders].
    """
    x = positions(x).transpose(1, 2)  # (B, M, C)
    d = sketches[0].shape[1]
    spectrum = torch.fft.rfft(x @ sketches[0], dim=-1)
    out = []
    for k in range(1, orders):
        spectrum = spectrum * torch.fft.rfft(x @ sketches[k], dim=-1)
        # The inverse FFT is linear: average the spectra over positions first, invert once.
        out.append(torch.fft.irfft(spectrum.mean(dim=1), n=d, dim=-1))
    return out


def count_sketch(x: Tensor, hashes: Tensor, signs: Tensor, out_dim: int) -> Tensor:
    """Count sketch of the rows of ``x`` without a dense matrix: y[h(c)] += s(c)·x[c].

    Args:
        x: (..., C). hashes: (C,) integer bins in [0, out_dim). signs: (C,) ±1.
    Returns:
        (..., out_dim); equal to ``x @ P`` for the dense count-sketch matrix P, in O(C) per row
        instead of O(C·out_dim).
    """
    out = x.new_zeros(*x.shape[:-1], out_dim)
    return out.index_add_(-1, hashes, x * signs.to(x.dtype))


@full_precision
def tensor_sketch_hashed(x: Tensor, hashes: Tensor, signs: Tensor, out_dim: int, orders: int = 2):
    """:func:`tensor_sketch` with the count sketches given as (hashes, signs) rows of shape (n, C)."""
    x = positions(x).transpose(1, 2)  # (B, M, C)
    spectrum = torch.fft.rfft(count_sketch(x, hashes[0], signs[0], out_dim), dim=-1)
    out = []
    for k in range(1, orders):
        spectrum = spectrum * torch.fft.rfft(count_sketch(x, hashes[k], signs[k], out_dim), dim=-1)
        out.append(torch.fft.irfft(spectrum.mean(dim=1), n=out_dim, dim=-1))
    return out


@full_precision
def tensor_sketch_gram(x: Tensor, hashes: Tensor, signs: Tensor, out_dim: int) -> Tensor:
    """Order-2 Tensor Sketch averaged over positions, computed from the Gram matrix: no FFT.

    Σ_m TS(x_m) only depends on G = (1/M) Σ_m x_m x_mᵀ: the circular convolution of two count
    sketches sends the product x_i x_j to bin (h₁(i) + h₂(j)) mod d with sign s₁(i)s₂(j), so
    TS = Σ_{i,j} G_ij s₁(i)s₂(j) e_{(h₁(i)+h₂(j)) mod d}. One batched matmul and one scatter of C²
    values replace M forward and inverse FFTs of length d — the same numbers, in a fraction of the time.

    Args:
        x: (B, C, H, W) or (B, C, M). hashes, signs: (2, C) (bins and ±1 of the two sketches).
    Returns:
        (B, out_dim), equal to ``tensor_sketch_hashed(x, hashes, signs, out_dim)[0]``.
    """
    g = gram(x)  # (B, C, C)
    bins = (hashes[0].unsqueeze(1) + hashes[1].unsqueeze(0)).remainder(out_dim).flatten()
    pair_signs = (signs[0].unsqueeze(1) * signs[1].unsqueeze(0)).flatten().to(g.dtype)
    return g.new_zeros(g.shape[0], out_dim).index_add_(1, bins, g.flatten(1) * pair_signs)


@full_precision
def tensor_sketch_gram_dense(x: Tensor, hashes: Tensor, signs: Tensor, out_dim: int) -> Tensor:
    """:func:`tensor_sketch_gram` with matmul and gather instead of a scatter, for ONNX (which has no index_add).

    TS[k] = Σ_i s₁(i) R_i[(k − h₁(i)) mod d] with R = G P₂ (P₂ the dense second count sketch): row i's sketch
    of the second index, shifted by its first bin. No FFT, so a bin that no channel pair reaches, or whose pairs
    are all 0 (dead channels), is exactly 0 as in the eager path; an FFT would leave ±1e-17 there, which the
    signed square root sign(z)√(|z| + ε) turns into a jump of 2√ε.

    Args:
        x: (B, C, H, W) or (B, C, M). hashes, signs: (2, C).
    Returns:
        (B, out_dim), equal to :func:`tensor_sketch_gram` up to rounding, with the same exact zeros.
    """
    g = gram(x)  # (B, C, C)
    second = F.one_hot(hashes[1], out_dim).to(g.dtype) * signs[1].to(g.dtype).unsqueeze(-1)  # (C, d)
    rows = g @ second  # (B, C, d)
    bins = torch.arange(out_dim, device=g.device)
    shift = (bins.unsqueeze(0) - hashes[0].unsqueeze(1)).remainder(out_dim)  # (C, d)
    shifted = torch.gather(rows, 2, shift.unsqueeze(0).expand(rows.shape[0], -1, -1))
    return (shifted * signs[0].to(g.dtype).view(1, -1, 1)).sum(dim=1)


@full_precision
def random_maclaurin(x: Tensor, w1: Tensor, w2: Tensor) -> Tensor:
    """Random Maclaurin features of the degree-2 polynomial kernel, averaged over positions.

    y = (1/M) Σ_m (x_m W₁) ∘ (x_m W₂) / √d with Rademacher W₁, W₂ (C, d): E⟨y(x), y(z)⟩ = ⟨x, z⟩²
    for single positions (Kar & Karnick, AISTATS 2012; Gao et al., CVPR 2016).

    Args:
        x: (B, C, H, W) or (B, C, M). w1, w2: (C, d).
    Returns:
        (B, d).
    """
    x = positions(x).transpose(1, 2)
    return ((x @ w1) * (x @ w2)).mean(dim=1) / w1.shape[1] ** 0.5


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
        (KP) by hashed count sketches and FFTs. Exports use dense matrices, because ONNX has no
        index_add and a matmul exports everywhere: order 2 still from the Gram matrix without an FFT
        (:func:`tensor_sketch_gram_dense`), so that its exact zeros are those of the eager path.
        """
        if torch.jit.is_tracing() or torch.onnx.is_in_onnx_export() or torch.compiler.is_compiling():
            if orders == 2:
                return [tensor_sketch_gram_dense(x, self.hashes, self.signs, self.out_dim)]
            return tensor_sketch(x, self.matrices(x.dtype), orders=orders)
        if orders == 2:  # CBP: from the Gram matrix, no FFT (same values)
            return [tensor_sketch_gram(x, self.hashes, self.signs, self.out_dim)]
        return tensor_sketch_hashed(x, self.hashes, self.signs, self.out_dim, orders=orders)
