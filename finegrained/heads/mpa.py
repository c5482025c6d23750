"""Covariance pooling with the matrix square root by MPA-Lya (or MTP-Lya).

Song, Sebe, Wang, "Fast Differentiable Matrix Square Root", ICLR 2022 (code:
KingJamesSong/FastDifferentiableMatSqrt).

    1×1 reduction (C -> 256, BN, ReLU) -> Σ -> Σ^{1/2} by the [5/5] Padé approximant after Frobenius
    normalisation (or the degree-10 Taylor polynomial, ``method="mtp"``), backward by the Lyapunov
    equation with 8 coupled sign iterations (:func:`finegrained.ops.sqrtm_pade`) -> upper triangle

ONNX has no linear solver: for export, Q⁻¹ of the same Padé approximant comes from Newton–Schulz
(``substitute_iterations``), so the ONNX graph computes the same Q⁻¹P with matmuls only;
``finegrained export`` measures and prints the difference. TorchScript exports the Cholesky form itself.

Shapes: (B, C, H, W) -> (B, d(d+1)/2); 32,896 for d = 256.
"""
from __future__ import annotations

from typing import Optional

from torch import Tensor

from finegrained.heads import register_head
from finegrained.heads.covariance_pooling import CovariancePoolingHead
from finegrained.ops import sqrtm_pade
from finegrained.ops.pade import METHODS as PADE_METHODS


@register_head("mpa", "MPA-Lya")
class MPALyaHead(CovariancePoolingHead):
    """MPA-Lya covariance pooling head.

    Args:
        in_channels: C.
        reduction: d after the 1×1 reduction (256); ``None`` keeps C.
        method: ``"mpa"`` (Padé, the authors' default) or ``"mtp"`` (Taylor, faster, less accurate).
        backward_iterations: coupled sign iterations of the Lyapunov backward (8).
        substitute_iterations: Newton–Schulz iterations of the ONNX substitute.
    """
    paper = 'Song, Sebe, Wang, "Fast Differentiable Matrix Square Root", ICLR 2022.'

    def __init__(self, in_channels: int, reduction: Optional[int] = 256, method: str = "mpa",
                 backward_iterations: int = 8, substitute_iterations: int = 20):
        if method not in PADE_METHODS:  # refused when the model is built, not at its first forward
            raise ValueError(f"head 'mpa': method must be one of {PADE_METHODS}, got {method!r}")
        super().__init__(in_channels, reduction)
        self.method, self.backward_iterations = method, backward_iterations
        self.substitute_iterations = substitute_iterations

    def export_substitute(self) -> Optional[str]:
        if self.method == "mtp":
            return None  # matmuls only: exports as it is
        return f"mpa: the Padé Q⁻¹ by Newton–Schulz ({self.substitute_iterations} iterations) instead of a linear solve"

    def matrix_function(self, sigma: Tensor) -> Tensor:
        inverse_iterations = self.substitute_iterations if self.use_substitute and self.method == "mpa" else 0
        return sqrtm_pade(sigma, self.method, self.backward_iterations, inverse_iterations)
