"""Matrix square roots by the coupled Newton–Schulz iteration, with their backward passes.

* :func:`sqrtm_newton_schulz` -- the iterative matrix square root of iSQRT-COV: "Towards Faster
  Training of Global Covariance Pooling Networks by Iterative Matrix Square Root Normalization",
  Li, Xie, Wang, Gao, CVPR 2018 (trace pre-normalisation, N iterations, √tr post-compensation).
* :func:`isqrt_cov` -- covariance, Newton–Schulz and compensation fused in one autograd.Function
  with a lean backward (:class:`_ISqrtCov`).
* :func:`sqrtm_newton_schulz_lyapunov` -- improved B-CNN's square root (Lin & Maji, BMVC 2017):
  Frobenius pre-normalisation, Newton–Schulz forward, coupled-Lyapunov backward
  (:func:`lyapunov_newton_schulz`).

Shapes: (B, d, d) matrices; :func:`isqrt_cov` takes (B, C, H, W) or (B, C, M) features.
"""
from __future__ import annotations

import torch
from torch import Tensor

from finegrained.ops.backward import first_order_only
from finegrained.ops.covariance import batch_trace, check_square, covariance, positions, safe_normaliser, unit_frobenius
from finegrained.ops.precision import full_precision


def newton_schulz(a: Tensor, iterations: int) -> Tensor:
    """Y_N of the coupled Newton–Schulz iteration for A^{1/2}; every square root here uses it.

    Y₀ = A, Z₀ = I, and for k = 1..N with T_k = ½(3I − Z_{k−1} Y_{k−1}):
    Y_k = Y_{k−1} T_k,  Z_k = T_k Z_{k−1}  (Higham, "Functions of Matrices", 2008; iSQRT-COV).

    The first step uses Z₀ = I (T₁ = ½(3I − A), one matmul) and the last computes Y only; both
    are exact rewrites of the iteration, not approximations. It converges when the eigenvalues of
    the symmetric A lie in (0, 1]: callers normalise by the trace (iSQRT-COV) or the Frobenius norm.

    Args:
        a: (B, d, d) symmetric positive semi-definite matrices, normalised.
        iterations: N ≥ 1.
    Returns:
        (B, d, d) approximation of A^{1/2}.
    """
    if iterations < 1:
        raise ValueError(f"iterations must be >= 1, got {iterations}")
    eye3 = 3.0 * torch.eye(a.shape[-1], dtype=a.dtype, device=a.device)
    t = 0.5 * (eye3 - a)
    y = a @ t
    if iterations == 1:
        return y
    z = t
    for _ in range(iterations - 2):
        t = 0.5 * (eye3 - z @ y)
        y, z = y @ t, t @ z
    return y @ (0.5 * (eye3 - z @ y))


@full_precision
def sqrtm_newton_schulz(sigma: Tensor, iterations: int = 5) -> Tensor:
    """Approximate matrix square root of SPD matrices by coupled Newton–Schulz (iSQRT-COV).

    1. Pre-normalise by the trace, A = Σ / tr Σ, so that ‖I − A‖ < 1 and the
       iteration converges.
    2. N iterations of :func:`newton_schulz`.
    3. Post-compensate: √(tr Σ) · Y_N.

    Args:
        sigma: (B, d, d) symmetric positive semi-definite matrices.
        iterations: N ≥ 1 (5 in the fine-grained and ImageNet models, 3 in GM-SOP).
    Returns:
        (B, d, d) approximation of Σ^{1/2}.
    """
    if iterations < 1:
        raise ValueError(f"iterations must be >= 1, got {iterations}")
    check_square(sigma)
    # A zero matrix (all-zero or constant features) has trace 0: it stays exactly 0, not NaN.
    trace = safe_normaliser(batch_trace(sigma)).view(-1, 1, 1)
    return newton_schulz(sigma / trace, iterations) * trace.sqrt()


def lyapunov_newton_schulz(z: Tensor, g: Tensor, iterations: int = 5) -> Tensor:
    """Solve Z X + X Z = G by the coupled Newton–Schulz sign iteration (Lin & Maji, BMVC 2017).

    With a = Z/‖Z‖_F and q = G/‖Z‖_F, repeat q ← ½[q(3I − a²) − aᵀ(aᵀq − qa)], a ← ½a(3I − a²);
    then X ≈ ½q. This is the sign iteration of [[Z, G], [0, −Z]], whose sign is [[I, 2X], [0, −I]].

    Args:
        z: (B, d, d) symmetric positive semi-definite (a matrix square root).
        g: (B, d, d) right-hand side (the gradient with respect to the square root).
    Returns:
        (B, d, d) X.
    """
    eye3 = 3.0 * torch.eye(z.shape[-1], dtype=z.dtype, device=z.device)
    a, norm = unit_frobenius(z)
    q = g / norm
    for _ in range(iterations):
        a2 = a @ a
        at = a.transpose(-1, -2)
        q = 0.5 * (q @ (eye3 - a2) - at @ (at @ q - q @ a))
        a = 0.5 * a @ (eye3 - a2)
    return 0.5 * q


class _NewtonSchulzLyapunov(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, iterations, backward_iterations):
        y = newton_schulz(a, iterations)
        ctx.save_for_backward(y)
        ctx.backward_iterations = backward_iterations
        return y

    @staticmethod
    @first_order_only("sqrtm_newton_schulz_lyapunov")
    def backward(ctx, grad):
        (y,) = ctx.saved_tensors
        return lyapunov_newton_schulz(y, grad, ctx.backward_iterations), None, None


@full_precision
def sqrtm_newton_schulz_lyapunov(sigma: Tensor, iterations: int = 5, backward_iterations: int = 5) -> Tensor:
    """Improved B-CNN's matrix square root: A/‖A‖_F -> Newton–Schulz -> × √‖A‖_F.

    The backward through the normalised square root Z is not the unrolled forward: it solves the
    Lyapunov equation Z X + X Z = ∂l/∂Z with :func:`lyapunov_newton_schulz`. The pre-normalisation
    and the compensation are differentiated by autograd.

    Args:
        sigma: (B, d, d) symmetric positive semi-definite.
        iterations: forward Newton–Schulz iterations (5 in the paper).
        backward_iterations: Lyapunov iterations (5 in the paper).
    Returns:
        (B, d, d) approximation of Σ^{1/2}.
    """
    check_square(sigma)
    a, norm = unit_frobenius(sigma)
    if torch.is_grad_enabled() and a.requires_grad:
        root = _NewtonSchulzLyapunov.apply(a, iterations, backward_iterations)
    else:  # inference and export: the same forward without the autograd.Function
        root = newton_schulz(a, iterations)
    return root * norm.sqrt()


# ---------------------------------------------------------------------------------------------
# Fused iSQRT-COV: covariance -> Newton–Schulz -> compensation with a lean backward
# ---------------------------------------------------------------------------------------------
class _ISqrtCov(torch.autograd.Function):
    """C = √tr(Σ)·NS_N(Σ/tr Σ) with Σ the covariance of X, storing only what backward needs.

    Every Newton–Schulz iterate is a polynomial in the symmetric A = Σ/tr Σ, so all of them are
    symmetric and commute. With P_k = Z_k Y_k and q_k = ½(3I − P_k) the coupled iteration becomes

        Y_0 = P_0 = A,   Y_{k+1} = Y_k q_k,   P_{k+1} = P_k q_k² = φ(P_k),   φ(P) = ¼P(3I − P)²,

    the same numbers with no Z and no identity matrix (q_k is applied as 1.5·M − 0.5·M P_k).
    Backward keeps X (already held by the layer before), A, P_1 … P_{N−1} and Y_{N−1}: N + 1 C×C
    matrices, against autograd's centred features plus Y, Z and T of every iteration, and it
    recomputes Y_1 … Y_{N−2} (N − 2 matmuls).

    Only the symmetric part of ∂A matters (Σ is symmetric), so the adjoint of every symmetric state
    may be replaced by its symmetric part. Then the adjoint of φ at P for a symmetric G is

        φ'(P)*[G] = ¼(9G − 6(W + Wᵀ) + V + Vᵀ + P W),   W = G P,   V = W P,

    three matmuls where autograd through P q q spends four, and Y_k q_k costs two (∂Y_k = ∂Y_{k+1} q_k,
    ∂q_k = sym(Y_k ∂Y_{k+1})). In all 3N − 3 matmuls forward and 6N − 5 backward, against autograd's
    3N and 6N − 4 on the same formulas (iSQRT-COV, Li et al., CVPR 2018). The trace terms of
    pre-normalisation and post-compensation are added to the diagonal in one batched operation.
    """

    @staticmethod
    def forward(ctx, x, iterations):
        m = x.shape[-1]
        centred = x - x.mean(dim=2, keepdim=True)
        scatter = torch.bmm(centred, centred.transpose(1, 2))  # M·Σ
        del centred
        trace = safe_normaliser(batch_trace(scatter).div_(m))  # tr Σ
        a = scatter.div_((trace * m).view(-1, 1, 1))  # Σ / tr Σ in one pass
        y, p, ps = a, a, []
        for k in range(iterations - 1):
            y_next = torch.baddbmm(y, y, p, beta=1.5, alpha=-0.5)  # Y_{k+1} = Y_k q_k
            # P_{k+1} = P_k q_k²; for k = 0, P_1 = Y_1 q_0 saves a matmul.
            half = y_next if k == 0 else torch.baddbmm(p, p, p, beta=1.5, alpha=-0.5)
            p_next = torch.baddbmm(half, half, p, beta=1.5, alpha=-0.5)
            y, p = y_next, p_next
            ps.append(p)
        ctx.save_for_backward(x, a, trace, y, *ps)  # y = Y_{N−1} (A when N = 1)
        ctx.iterations = iterations
        return torch.baddbmm(y, y, p, beta=1.5, alpha=-0.5).mul_(trace.sqrt().view(-1, 1, 1))

    @staticmethod
    @first_order_only("isqrt_cov")
    def backward(ctx, grad_out):
        x, a, trace, y_last, *ps = ctx.saved_tensors
        n = ctx.iterations
        ps = [a, *ps]  # P_0 … P_{N−1}
        ys = [a]  # Y_0 … Y_{N−1}
        for k in range(n - 2):
            ys.append(torch.baddbmm(ys[-1], ys[-1], ps[k], beta=1.5, alpha=-0.5))
        if n >= 2:
            ys.append(y_last)
        root = trace.sqrt().view(-1, 1, 1)
        g_y = grad_out * root
        g_post = None
        # φ'* of the step above, pending as base + J + Jᵀ so that the transpose is added once.
        base, half_sym = None, None
        for k in range(n - 1, -1, -1):
            s = torch.bmm(ys[k], g_y)  # ∂q_k = sym(Y_k ∂Y_{k+1})
            if k == n - 1:  # ⟨∂C, Y_N⟩ = ⟨Y_{N−1} ∂C, q_{N−1}⟩, for the compensation's trace term
                g_post = (1.5 * s.diagonal(dim1=1, dim2=2).sum(-1) - 0.5 * (s * ps[k]).sum(dim=(1, 2))) / (
                    2 * trace)
            g_y = torch.baddbmm(g_y, g_y, ps[k], beta=1.5, alpha=-0.5)  # ∂Y_k = ∂Y_{k+1} q_k
            # ∂P_k = φ'(P_k)*[∂P_{k+1}] − ¼(S + Sᵀ), q_k = 3/2 I − ½ P_k.
            half_sym = s.mul_(-0.25) if half_sym is None else half_sym.sub_(s, alpha=0.25)
            if base is None:
                g_p = half_sym + half_sym.transpose(1, 2)
            else:
                g_p = base.add_(half_sym).add_(half_sym.transpose(1, 2))
            if k == 0:
                g_a = g_y.add_(g_p)  # Y_0 = P_0 = A
                break
            p = ps[k - 1]
            w = torch.bmm(g_p, p)
            base = torch.baddbmm(g_p, p, w, beta=2.25, alpha=0.25)
            half_sym = torch.bmm(w, p).mul_(0.25).sub_(w, alpha=1.5)
        # A = Σ / tr Σ and C = √tr · Y_N; the 1/M of Σ = X̄ X̄ᵀ / M is applied here, on C×C.
        m = x.shape[-1]
        g_trace = g_post - (g_a * a).sum(dim=(1, 2)) / trace
        g_sigma = g_a.div_((trace * m).view(-1, 1, 1))  # ∂Σ / M
        g_sigma.diagonal(dim1=1, dim2=2).add_(g_trace.view(-1, 1) / m)
        # ∂X = (∂Σ + ∂Σᵀ) X̄ / M (X̄ has zero row mean, so centring adds nothing).
        centred = x - x.mean(dim=2, keepdim=True)
        return torch.bmm(g_sigma + g_sigma.transpose(1, 2), centred), None


@full_precision
def isqrt_cov(x: Tensor, iterations: int = 5) -> Tensor:
    """iSQRT-COV's normalised covariance √tr(Σ)·NS_N(Σ/tr Σ) of a feature map, in one step.

    The same function as ``sqrtm_newton_schulz(covariance(x), iterations)`` with less than half of
    autograd's saved memory and fewer matmuls (see :class:`_ISqrtCov`); used by the ``isqrt`` head
    when gradients are needed.

    Args:
        x: (B, C, H, W) or (B, C, M). iterations: N ≥ 1.
    Returns:
        (B, C, C).
    """
    x = positions(x)
    if iterations < 1:
        raise ValueError(f"iterations must be >= 1, got {iterations}")
    if torch.is_grad_enabled() and x.requires_grad:
        return _ISqrtCov.apply(x, iterations)
    return sqrtm_newton_schulz(covariance(x), iterations)
