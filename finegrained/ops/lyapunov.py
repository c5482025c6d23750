"""The coupled-Lyapunov backward of improved B-CNN (Lin & Maji, "Improved Bilinear Pooling with CNNs", BMVC 2017)
and MPA-Lya (Song, Sebe, Wang, "Fast Differentiable Matrix Square Root", ICLR 2022).

* :func:`lyapunov_newton_schulz` -- the solution X of Z X + X Z = G by the coupled Newton–Schulz sign iteration.
* :func:`root_with_lyapunov_backward` -- a square root whose backward is that solution, returned as the gradient
  of the input matrix, as the authors' code does (matrix-sqrt's ``lyap_newton_schulz``, FastDifferentiableMatSqrt's
  ``torch_utils.py``); also the backward of the Padé square root in :mod:`finegrained.ops.pade`.
* :func:`sqrtm_newton_schulz_lyapunov` -- improved B-CNN's square root: Frobenius pre-normalisation, Newton–Schulz
  forward, that backward.

Shapes: (B, d, d) matrices.
"""
from __future__ import annotations

import functools

import torch
from torch import Tensor

from finegrained.ops.backward import first_order_only
from finegrained.ops.covariance import check_square, unit_frobenius
from finegrained.ops.newton_schulz import newton_schulz
from finegrained.ops.precision import full_precision


def lyapunov_newton_schulz(z: Tensor, g: Tensor, iterations: int = 5, normalise: bool = True) -> Tensor:
    """Solve Z X + X Z = G by the coupled Newton–Schulz sign iteration (Lin & Maji, BMVC 2017; the
    backward of MPA-Lya, Song, Sebe & Wang, ICLR 2022).

    With a = Z/‖Z‖_F and q = G/‖Z‖_F, repeat q ← ½[q(3I − a²) − aᵀ(aᵀq − qa)], a ← ½a(3I − a²);
    then X ≈ ½q. This is the sign iteration of [[Z, G], [0, −Z]], whose sign is [[I, 2X], [0, −I]].

    Args:
        z: (B, d, d) symmetric positive semi-definite (a matrix square root).
        g: (B, d, d) right-hand side (the gradient with respect to the square root).
        normalise: divide by ‖Z‖_F first; ``False`` when Z's eigenvalues already lie in [0, 1] (MPA-Lya starts
            from the root of the Frobenius-normalised matrix as it is).
    Returns:
        (B, d, d) X.
    """
    eye3 = 3.0 * torch.eye(z.shape[-1], dtype=z.dtype, device=z.device)
    a, norm = unit_frobenius(z) if normalise else (z, 1.0)
    q = g / norm
    for _ in range(iterations):
        a2 = a @ a
        at = a.transpose(-1, -2)
        q = 0.5 * (q @ (eye3 - a2) - at @ (at @ q - q @ a))
        a = 0.5 * a @ (eye3 - a2)
    return 0.5 * q


class _RootWithLyapunovBackward(torch.autograd.Function):
    """Σ -> S = f(Σ/‖Σ‖_F)·√‖Σ‖_F for an approximate square root f; the backward returns the solution X of
    S X + X S = ∂l/∂S as ∂l/∂Σ (the authors' backward, see :func:`root_with_lyapunov_backward`)."""

    @staticmethod
    def forward(ctx, sigma, unit_root, backward_iterations, normalise_root):
        a, norm = unit_frobenius(sigma)
        root = unit_root(a)
        ctx.save_for_backward(root, norm)
        ctx.backward_iterations, ctx.normalise_root = backward_iterations, normalise_root
        return root * norm.sqrt()

    @staticmethod
    @first_order_only("a square root with the Lyapunov backward (improved B-CNN, MPA-Lya)")
    def backward(ctx, grad):
        root, norm = ctx.saved_tensors  # root: f(Σ/‖Σ‖_F), eigenvalues in [0, 1]
        scale = norm.sqrt()
        if ctx.normalise_root:  # matrix-sqrt: the iteration starts from S/‖S‖_F, with G/‖S‖_F
            x = lyapunov_newton_schulz(root * scale, grad, ctx.backward_iterations, normalise=True)
        else:  # FastDifferentiableMatSqrt: from S/√‖Σ‖_F (the normalised root itself), with G/√‖Σ‖_F
            x = lyapunov_newton_schulz(root, grad / scale, ctx.backward_iterations, normalise=False)
        return x, None, None, None


def root_with_lyapunov_backward(sigma: Tensor, unit_root, backward_iterations: int, normalise_root: bool) -> Tensor:
    """Σ^{1/2} ≈ ``unit_root``(Σ/‖Σ‖_F)·√‖Σ‖_F whose gradient is the authors' Lyapunov backward, not autograd
    through the approximation: ∂l/∂Σ = X with S X + X S = ∂l/∂S, by :func:`lyapunov_newton_schulz`, returned
    directly as the gradient of Σ (the normalisation and the compensation are not differentiated separately;
    at convergence X is the exact derivative of Σ^{1/2}).

    * ``normalise_root=True``: the iteration starts from S/‖S‖_F (``lyap_newton_schulz`` of
      msubhransu/matrix-sqrt, ``matrix_sqrt.py``: improved B-CNN);
    * ``normalise_root=False``: from S/√‖Σ‖_F, the root of the normalised matrix (``MPA_Lya.backward`` of
      KingJamesSong/FastDifferentiableMatSqrt, ``torch_utils.py``).

    Args:
        sigma: (B, d, d) symmetric positive semi-definite.
        unit_root: maps (B, d, d) with eigenvalues in [0, 1] to an approximation of its square root.
    Returns:
        (B, d, d). Outside autograd (inference, export) the forward alone.
    """
    if torch.is_grad_enabled() and sigma.requires_grad:
        return _RootWithLyapunovBackward.apply(sigma, unit_root, backward_iterations, normalise_root)
    a, norm = unit_frobenius(sigma)
    return unit_root(a) * norm.sqrt()


@full_precision
def sqrtm_newton_schulz_lyapunov(sigma: Tensor, iterations: int = 5, backward_iterations: int = 5) -> Tensor:
    """Improved B-CNN's matrix square root (Lin & Maji, BMVC 2017; code msubhransu/matrix-sqrt):
    A/‖A‖_F -> Newton–Schulz -> × √‖A‖_F, with the authors' backward: the Lyapunov equation
    S X + X S = ∂l/∂S solved by :func:`lyapunov_newton_schulz` from S/‖S‖_F, X returned as ∂l/∂A
    (:func:`root_with_lyapunov_backward`).

    Args:
        sigma: (B, d, d) symmetric positive semi-definite.
        iterations: forward Newton–Schulz iterations (5 in the paper).
        backward_iterations: Lyapunov iterations (5 in the paper).
    Returns:
        (B, d, d) approximation of Σ^{1/2}.
    """
    check_square(sigma)
    return root_with_lyapunov_backward(sigma, functools.partial(newton_schulz, iterations=iterations),
                                       backward_iterations, normalise_root=True)
