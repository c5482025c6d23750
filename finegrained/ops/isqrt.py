"""Fused iSQRT-COV (Li, Xie, Wang, Gao, "Towards Faster Training of Global Covariance Pooling Networks by Iterative
Matrix Square Root Normalization", CVPR 2018): covariance -> trace normalisation -> Newton–Schulz -> √tr
compensation in one ``autograd.Function`` with a lean backward (:class:`_ISqrtCov`).

Two backward routes, chosen per device by :func:`isqrt_backward_route`: the adjoint of the Newton–Schulz iteration
(CUDA), or one ``eigh`` of the normalised matrix whose eigenvectors give the forward value and, by divided
differences of the scalar iteration, the exact gradient (CPU).

Shapes: :func:`isqrt_cov` takes (B, C, H, W) or (B, C, M) features and returns (B, C, C).
"""
from __future__ import annotations

import logging

import torch
from torch import Tensor

from finegrained.ops.backward import first_order_only
from finegrained.ops.covariance import batch_trace, covariance, positions, safe_normaliser
from finegrained.ops.newton_schulz import sqrtm_newton_schulz
from finegrained.ops.precision import full_precision

BACKWARD_ROUTES = ("newton_schulz", "eigh")


def isqrt_backward_route(device: torch.device) -> str:
    """The backward :func:`isqrt_cov` uses on ``device`` when none is asked for: the one place it is chosen.

    On a CPU one batched ``eigh`` of A costs about ten matmuls, so the spectral backward (4 matmuls
    after it) beats the 25 of the Newton–Schulz adjoint; on CUDA ``eigh`` is slow and the
    Newton–Schulz adjoint wins (``finegrained bench heads`` times both on every device).
    """
    return "eigh" if device.type == "cpu" else "newton_schulz"


def _iterates(a: Tensor, iterations: int):
    """Y_N and what the Newton–Schulz adjoint needs: Y_{N−1} and P_1 … P_{N−1} (see :class:`_ISqrtCov`)."""
    y, p, ps = a, a, []
    for k in range(iterations):
        q = p * -0.5  # q_k = 3/2 I − ½ P_k, formed once and used by every product of the step
        q.diagonal(dim1=1, dim2=2).add_(1.5)
        y_next = torch.bmm(y, q)  # Y_{k+1} = Y_k q_k
        if k == iterations - 1:
            return y_next, y, ps
        # P_{k+1} = P_k q_k²; for k = 0, P_0 q_0 = Y_1 saves a matmul.
        p = torch.bmm(y_next if k == 0 else torch.bmm(p, q), q)
        y = y_next
        ps.append(p)


def _adjoint_newton_schulz(a: Tensor, y_last: Tensor, ps, g_y: Tensor, iterations: int):
    """(∂A, ⟨G_Y, Y_N⟩) from ∂Y_N = g_y by the symmetric adjoint of the P-form iteration (6N − 5 matmuls)."""
    n = iterations
    ps = [a, *ps]  # P_0 … P_{N−1}
    ys = [a]  # Y_0 … Y_{N−1}
    for k in range(n - 2):
        ys.append(torch.baddbmm(ys[-1], ys[-1], ps[k], beta=1.5, alpha=-0.5))
    if n >= 2:
        ys.append(y_last)
    inner_out = None
    # φ'* of the step above, pending as base + J + Jᵀ so that the transpose is added once.
    base, half_sym = None, None
    for k in range(n - 1, -1, -1):
        s = torch.bmm(ys[k], g_y)  # ∂q_k = sym(Y_k ∂Y_{k+1})
        if k == n - 1:  # ⟨G, Y_N⟩ = ⟨Y_{N−1} G, q_{N−1}⟩, for the compensation's trace term
            inner_out = 1.5 * s.diagonal(dim1=1, dim2=2).sum(-1) - 0.5 * (s * ps[k]).sum(dim=(1, 2))
        g_y = torch.baddbmm(g_y, g_y, ps[k], beta=1.5, alpha=-0.5)  # ∂Y_k = ∂Y_{k+1} q_k
        # ∂P_k = φ'(P_k)*[∂P_{k+1}] − ¼(S + Sᵀ), q_k = 3/2 I − ½ P_k.
        half_sym = s.mul_(-0.25) if half_sym is None else half_sym.sub_(s, alpha=0.25)
        if base is None:
            g_p = half_sym + half_sym.transpose(1, 2)
        else:
            g_p = base.add_(half_sym).add_(half_sym.transpose(1, 2))
        if k == 0:
            return g_y.add_(g_p), inner_out  # Y_0 = P_0 = A
        p = ps[k - 1]
        w = torch.bmm(g_p, p)
        base = torch.baddbmm(g_p, p, w, beta=2.25, alpha=0.25)
        half_sym = torch.bmm(w, p).mul_(0.25).sub_(w, alpha=1.5)


def newton_schulz_divided_differences(lam: Tensor, iterations: int, scale: Tensor | None = None):
    """(f(λ), D) of the scalar Newton–Schulz map f = NS_N, D_ij = f[λ_i, λ_j] its divided differences.

    D_ij = (f(λ_i) − f(λ_j)) / (λ_i − λ_j), and f'(λ_i) where λ_i = λ_j, computed by running the
    divided-difference product rule f·g[a, b] = f(a)·g[a, b] + f[a, b]·g(b) through the iteration
    y₀ = p₀ = λ, q = 3/2 − p/2, y ← y q, p ← p q², so that close eigenvalues lose no digits:

        y_{k+1}[a, b] = y_k[a, b]·q_k(b) − ½ y_k(a)·p_k[a, b],
        p_{k+1}[a, b] = p_k[a, b]·(q_k(b)² − ½ p_k(a) q_k(a) − ½ p_k(a) q_k(b)),

    the second factor a rank-3 outer product (one batched matmul with inner size 3).

    Args:
        lam: (B, d) eigenvalues. iterations: N.
        scale: optional (B,) factor that D comes out multiplied by (free: applied to vectors).
    Returns:
        f(λ) (B, d) and D (B, d, d), symmetric.
    """
    y, p = lam, lam
    dy = dp = None
    for k in range(iterations):
        q = 1.5 - 0.5 * p
        q_b, minus_half_y_a = q, -0.5 * y
        if k == iterations - 1 and scale is not None:
            q_b, minus_half_y_a = q * scale.unsqueeze(-1), minus_half_y_a * scale.unsqueeze(-1)
        if dy is None:  # y_0[a, b] = p_0[a, b] = 1
            dy = minus_half_y_a.unsqueeze(-1) + q_b.unsqueeze(-2)
        else:
            dy = dy.mul_(q_b.unsqueeze(-2)).addcmul_(dp, minus_half_y_a.unsqueeze(-1))
        y = y * q
        if k == iterations - 1:
            return y, dy
        ones = torch.ones_like(q)
        left = torch.stack((ones, -0.5 * p * q, -0.5 * p), dim=-1)  # (B, d, 3), rows a
        right = torch.stack((q * q, ones, q), dim=-2)  # (B, 3, d), columns b
        factor = torch.bmm(left, right)
        dp = factor if dp is None else dp.mul_(factor)
        p = p * q * q


def newton_schulz_scalar(lam: Tensor, iterations: int) -> Tensor:
    """f(λ) = NS_N(λ), the Newton–Schulz iteration on eigenvalues: y₀ = p₀ = λ, q = 3/2 − p/2, y ← y q,
    p ← p q². Y_N(A) = U f(Λ) Uᵀ for A = U Λ Uᵀ, since every iterate is a polynomial in A. (B, d) -> (B, d)."""
    y, p = lam, lam
    for k in range(iterations):
        q = 1.5 - 0.5 * p
        y = y * q
        if k < iterations - 1:
            p = p * q * q
    return y


def _eigh(a: Tensor):
    """(λ, U) of the symmetric A, or None if the solver fails."""
    try:
        return torch.linalg.eigh(a)
    except torch.linalg.LinAlgError:
        return None


def _adjoint_eigh(lam: Tensor, u: Tensor, grad: Tensor, root: Tensor, scale: Tensor, iterations: int):
    """(scale·(∂A + ∂Aᵀ), ⟨G_Y, Y_N⟩, ⟨∂A, A⟩) for G_Y = root·grad, through A = U Λ Uᵀ.

    Y_N = U f(Λ) Uᵀ with f the scalar iteration, so ∂A = U (D ∘ Uᵀ G_Y U) Uᵀ with D the divided
    differences of f (Daleckii–Krein): the exact gradient of the Newton–Schulz output, in four matmuls
    once A is decomposed. ``root`` and ``scale`` are (B,) and ride on D's vectors, not on (B, d, d) passes.
    """
    values, d = newton_schulz_divided_differences(lam, iterations, scale * root)
    h = u.transpose(1, 2).bmm(grad).bmm(u)
    h_diag = h.diagonal(dim1=1, dim2=2)
    inner_out = (h_diag * values).sum(-1) * root
    inner_a = (h_diag * d.diagonal(dim1=1, dim2=2) * lam).sum(-1) / scale
    k = d.mul_(h + h.transpose(1, 2))
    return u.bmm(k).bmm(u.transpose(1, 2)), inner_out, inner_a


_fallback_reported = []


def _report_fallback() -> None:
    if not _fallback_reported:
        _fallback_reported.append(True)
        logging.getLogger(__name__).warning(
            "isqrt_cov: eigh failed; using the Newton-Schulz iteration and its adjoint for this batch (logged once)")


class _ISqrtCov(torch.autograd.Function):
    """C = √tr(Σ)·NS_N(Σ/tr Σ) with Σ the covariance of X, storing only what backward needs.

    Every Newton–Schulz iterate is a polynomial in the symmetric A = Σ/tr Σ, so all of them are
    symmetric and commute. With P_k = Z_k Y_k and q_k = ½(3I − P_k) the coupled iteration becomes

        Y_0 = P_0 = A,   Y_{k+1} = Y_k q_k,   P_{k+1} = P_k q_k² = φ(P_k),   φ(P) = ¼P(3I − P)²,

    the same numbers with no Z and no identity matrix (q_k is applied as 1.5·M − 0.5·M P_k):
    3N − 3 matmuls forward. Two exact backwards (``route``, chosen by :func:`isqrt_backward_route`):

    * ``"newton_schulz"``: keeps X, A, P_1 … P_{N−1} and Y_{N−1} (N + 1 C×C matrices) and recomputes
      Y_1 … Y_{N−2}. Only the symmetric part of ∂A matters (Σ is symmetric), so the adjoint of every
      symmetric state may be replaced by its symmetric part; the adjoint of φ at P for a symmetric G is
      φ'(P)*[G] = ¼(9G − 6(W + Wᵀ) + V + Vᵀ + P W), W = G P, V = W P (three matmuls where autograd
      spends four), and Y_k q_k costs two: 6N − 5 matmuls against autograd's 6N − 4.
    * ``"eigh"``: one ``eigh`` of A = U Λ Uᵀ serves both passes. Forward: Y_N = U f(Λ) Uᵀ with f the scalar
      iteration (:func:`newton_schulz_scalar`; the same values as the matrix iteration, one matmul instead of
      3N − 3); backward: ∂A = U (D ∘ Uᵀ G U) Uᵀ with D the divided differences of f
      (:func:`newton_schulz_divided_differences`). Keeps X, Λ and U. If ``eigh`` fails, the matrix iteration
      and the Newton–Schulz adjoint run instead, logged once.

    The trace terms of pre-normalisation and post-compensation are added to the diagonal in one
    batched operation (iSQRT-COV, Li et al., CVPR 2018).
    """

    @staticmethod
    def forward(ctx, x, iterations, route):
        m = x.shape[-1]
        centred = x - x.mean(dim=2, keepdim=True)
        scatter = torch.bmm(centred, centred.transpose(1, 2))  # M·Σ
        del centred
        trace = safe_normaliser(batch_trace(scatter).div_(m))  # tr Σ
        a = scatter.div_((trace * m).view(-1, 1, 1))  # Σ / tr Σ in one pass
        spectrum = _eigh(a) if route == "eigh" else None
        if route == "eigh" and spectrum is None:
            _report_fallback()
            route = "newton_schulz"
        ctx.iterations, ctx.route = iterations, route
        if spectrum is not None:
            lam, u = spectrum
            values = newton_schulz_scalar(lam, iterations) * trace.sqrt().view(-1, 1)
            ctx.save_for_backward(x, trace, lam, u)
            return torch.bmm(u * values.unsqueeze(1), u.transpose(1, 2))
        out, y, ps = _iterates(a, iterations)
        ctx.save_for_backward(x, a, trace, y, *ps)  # y = Y_{N−1} (A when N = 1)
        return out.mul_(trace.sqrt().view(-1, 1, 1))

    @staticmethod
    @first_order_only("isqrt_cov")
    def backward(ctx, grad_out):
        n = ctx.iterations
        if ctx.route == "eigh":
            x, trace, lam, u = ctx.saved_tensors
        else:
            x, a, trace, y_last, *ps = ctx.saved_tensors
        m = x.shape[-1]
        root, scale = trace.sqrt(), 1.0 / (trace * m)  # C = √tr · Y_N;  ∂Σ/M = ∂A / (tr·M) + trace terms
        if ctx.route == "eigh":
            g_sym, inner_out, inner_a = _adjoint_eigh(lam, u, grad_out, root, scale, n)
        else:
            g_a, inner_out = _adjoint_newton_schulz(a, y_last, ps, grad_out * root.view(-1, 1, 1), n)
            inner_a = (g_a * a).sum(dim=(1, 2))
            g_sym = (g_a + g_a.transpose(1, 2)).mul_(scale.view(-1, 1, 1))
        # Trace terms of A = Σ / tr Σ and of C = √tr · Y_N, on the diagonal of (∂Σ + ∂Σᵀ)/M.
        g_trace = (0.5 * inner_out - inner_a) / trace
        g_sym.diagonal(dim1=1, dim2=2).add_(2 * g_trace.view(-1, 1) / m)
        # ∂X = (∂Σ + ∂Σᵀ) X̄ / M (X̄ has zero row mean, so centring adds nothing).
        centred = x - x.mean(dim=2, keepdim=True)
        return torch.bmm(g_sym, centred), None, None


@full_precision
def isqrt_cov(x: Tensor, iterations: int = 5, backward: str = "auto") -> Tensor:
    """iSQRT-COV's normalised covariance √tr(Σ)·NS_N(Σ/tr Σ) of a feature map, in one step.

    The same function as ``sqrtm_newton_schulz(covariance(x), iterations)`` with less than half of
    autograd's saved memory and fewer matmuls (see :class:`_ISqrtCov`); used by the ``isqrt`` head
    when gradients are needed.

    Args:
        x: (B, C, H, W) or (B, C, M). iterations: N ≥ 1.
        backward: ``"auto"`` (:func:`isqrt_backward_route` of x's device), ``"eigh"`` or
            ``"newton_schulz"``; both give the exact gradient of the Newton–Schulz output.
    Returns:
        (B, C, C).
    """
    x = positions(x)
    if iterations < 1:
        raise ValueError(f"iterations must be >= 1, got {iterations}")
    route = isqrt_backward_route(x.device) if backward == "auto" else backward
    if route not in BACKWARD_ROUTES:
        raise ValueError(f"backward must be 'auto' or one of {BACKWARD_ROUTES}, got {backward!r}")
    if torch.is_grad_enabled() and x.requires_grad:
        return _ISqrtCov.apply(x, iterations, route)
    return sqrtm_newton_schulz(covariance(x), iterations)
