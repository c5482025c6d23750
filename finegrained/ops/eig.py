"""Matrix functions for global second-order pooling.

Pure tensor functions (they import nothing but torch) shared by the heads in
:mod:`finegrained.heads`:

* :func:`covariance` -- the sample covariance of a feature map, as in
  MPN-COV (Li et al., ICCV 2017) and iSQRT-COV (Li et al., CVPR 2018).
* :func:`sqrtm_newton_schulz` -- the iterative matrix square root of
  iSQRT-COV: "Towards Faster Training of Global Covariance Pooling Networks by
  Iterative Matrix Square Root Normalization", Li, Xie, Wang, Gao, CVPR 2018.
* :func:`triu_vec` -- upper-triangular vectorisation of symmetric matrices.
* :func:`signed_sqrt` -- element-wise signed square root of B-CNN
  (Lin, RoyChowdhury, Maji, ICCV 2015).
* :func:`eig_power`, :func:`eig_log` -- matrix power and logarithm through the symmetric
  eigendecomposition with the matrix-backprop (K-matrix) backward of Ionescu, Vantzos,
  Sminchisescu, "Matrix Backpropagation for Deep Networks with Structured Layers", ICCV 2015;
  used by MPN-COV (Li, Xie, Wang, Zuo, ICCV 2017), DeepO2P and G²DeNet (Wang, Li, Zhang, CVPR 2017).
* :func:`sqrtm_newton_schulz_lyapunov` -- improved B-CNN's square root (Lin & Maji, BMVC 2017):
  Frobenius pre-normalisation, Newton–Schulz forward, coupled-Lyapunov backward.
* :func:`logm_newton_schulz` -- an eigendecomposition-free matrix logarithm (inverse scaling and
  squaring), the ONNX substitute for :func:`eig_log`.
* :func:`count_sketch_matrix`, :func:`tensor_sketch`, :func:`random_maclaurin` -- the random
  feature maps of compact bilinear pooling (Gao, Beijbom, Zhang, Darrell, CVPR 2016) and
  kernel pooling (Cui et al., CVPR 2017).

Shapes use B for the batch, C (or d) for channels and M = H*W for positions.
"""
from __future__ import annotations

import functools
import math

import torch
from torch import Tensor

__all__ = ["covariance", "gram", "sqrtm_newton_schulz", "triu_vec", "signed_sqrt", "sym", "eig_power", "eig_log",
           "sqrtm_newton_schulz_lyapunov", "lyapunov_newton_schulz", "powm_newton_schulz", "logm_newton_schulz",
           "count_sketch_matrix", "count_sketch", "tensor_sketch", "tensor_sketch_hashed", "tensor_sketch_gram",
           "random_maclaurin",
           "isqrt_cov", "full_precision", "at_least_float32"]


def at_least_float32(t: Tensor) -> Tensor:
    """float16/bfloat16 -> float32; float32 and float64 unchanged."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def full_precision(fn):
    """Run ``fn(x, ...)`` in float32 (or float64) with autocast off.

    Covariances, Newton–Schulz and eigendecompositions lose their meaning in fp16/bf16 (traces and
    square roots underflow), and autocast would also run the matmuls inside custom autograd
    Functions in half precision; so under autocast the matrix functions take float32 inputs.
    """

    @functools.wraps(fn)
    def wrapper(x, *args, **kwargs):
        x = at_least_float32(x)
        if torch.is_autocast_enabled(x.device.type):
            with torch.autocast(device_type=x.device.type, enabled=False):
                return fn(x, *args, **kwargs)
        return fn(x, *args, **kwargs)

    return wrapper


def _positions(x: Tensor) -> Tensor:
    """(B, C, H, W) or (B, C, M) -> (B, C, M)."""
    if x.dim() == 4:
        return x.flatten(2)
    if x.dim() == 3:
        return x
    raise ValueError(f"expected a (B,C,H,W) feature map or (B,C,M) matrix, got shape {tuple(x.shape)}")


@full_precision
def gram(x: Tensor) -> Tensor:
    """Uncentred second moment G = (1/M) X Xᵀ.

    Args:
        x: (B, C, H, W) feature map (or (B, C, M)).
    Returns:
        (B, C, C) symmetric positive semi-definite matrices.
    """
    x = _positions(x)
    return torch.bmm(x, x.transpose(1, 2)).div_(x.shape[-1])


@full_precision
def covariance(x: Tensor) -> Tensor:
    """Sample covariance Σ = (1/M) Σ_i (x_i − μ)(x_i − μ)ᵀ over the M = H·W positions.

    The official iSQRT-COV code multiplies by an explicit M×M centring matrix;
    subtracting the mean gives the same Σ with O(C·M) memory instead of O(M²).

    Args:
        x: (B, C, H, W) feature map (or (B, C, M)).
    Returns:
        (B, C, C) covariance matrices (biased, i.e. normalised by M).
    """
    x = _positions(x)
    centred = x - x.mean(dim=2, keepdim=True)
    return torch.bmm(centred, centred.transpose(1, 2)).div_(x.shape[-1])


def _batch_trace(m: Tensor) -> Tensor:
    """(B, d, d) -> (B,)"""
    return m.diagonal(dim1=-2, dim2=-1).sum(-1)


def _safe_normaliser(t: Tensor) -> Tensor:
    """A positive normaliser (trace or norm), with 1 in place of (numerically) zero values.

    Dividing a zero matrix by 1 keeps it zero; dividing by a clamped tiny value instead would make
    the gradient 1/tiny = inf.
    """
    return torch.where(t > torch.finfo(t.dtype).tiny, t, torch.ones_like(t))


@full_precision
def sqrtm_newton_schulz(sigma: Tensor, iterations: int = 5) -> Tensor:
    """Approximate matrix square root of SPD matrices by coupled Newton–Schulz (iSQRT-COV).

    1. Pre-normalise by the trace, A = Σ / tr Σ, so that ‖I − A‖ < 1 and the
       iteration converges.
    2. Y₀ = A, Z₀ = I, and for k = 1..N with T_k = ½(3I − Z_{k−1} Y_{k−1}):
       Y_k = Y_{k−1} T_k,  Z_k = T_k Z_{k−1}.
    3. Post-compensate: √(tr Σ) · Y_N.

    The first step uses Z₀ = I (T₁ = ½(3I − A)) and the last step computes Y only;
    both are exact rewrites of the same iteration, not approximations.

    Args:
        sigma: (B, d, d) symmetric positive semi-definite matrices.
        iterations: N ≥ 1 (5 in the fine-grained and ImageNet models, 3 in GM-SOP).
    Returns:
        (B, d, d) approximation of Σ^{1/2}.
    """
    if iterations < 1:
        raise ValueError(f"iterations must be >= 1, got {iterations}")
    if sigma.dim() != 3 or sigma.shape[-1] != sigma.shape[-2]:
        raise ValueError(f"expected (B, d, d) matrices, got shape {tuple(sigma.shape)}")
    d = sigma.shape[-1]
    # A zero matrix (all-zero or constant features) has trace 0: it stays exactly 0, not NaN.
    trace = _safe_normaliser(_batch_trace(sigma))
    a = sigma / trace.view(-1, 1, 1)
    eye3 = 3.0 * torch.eye(d, dtype=sigma.dtype, device=sigma.device)

    t = 0.5 * (eye3 - a)
    y = a @ t
    if iterations == 1:
        return y * trace.sqrt().view(-1, 1, 1)
    z = t
    for _ in range(iterations - 2):
        t = 0.5 * (eye3 - z @ y)
        y, z = y @ t, t @ z
    y = y @ (0.5 * (eye3 - z @ y))
    return y * trace.sqrt().view(-1, 1, 1)


def triu_indices_flat(d: int, device: torch.device | None = None) -> Tensor:
    """Flat (row-major) indices of the upper triangle of a d×d matrix, diagonal included,
    in the order of ``torch.triu_indices(d, d)``: d(d+1)/2 entries."""
    rows, cols = torch.triu_indices(d, d, device=device)
    return rows * d + cols


def triu_vec(m: Tensor) -> Tensor:
    """Upper-triangular vectorisation, diagonal included, row-major, without rescaling.

    Args:
        m: (B, d, d) matrices (symmetric in every use here).
    Returns:
        (B, d(d+1)/2); for d = 256 that is 32,896 values.
    """
    if m.dim() != 3 or m.shape[-1] != m.shape[-2]:
        raise ValueError(f"expected (B, d, d) matrices, got shape {tuple(m.shape)}")
    d = m.shape[-1]
    return m.flatten(1).index_select(1, triu_indices_flat(d, m.device))


def signed_sqrt(x: Tensor, eps: float = 1e-5) -> Tensor:
    """Element-wise signed square root sign(x)·√(|x| + ε) of B-CNN.

    ε sits inside the root so that the gradient stays finite at 0.

    Args:
        x: any shape.
    Returns:
        same shape as ``x``.
    """
    return torch.sign(x) * torch.sqrt(x.abs() + eps)


def sym(m: Tensor) -> Tensor:
    """Symmetric part ½(M + Mᵀ) of (…, d, d) matrices."""
    return 0.5 * (m + m.transpose(-1, -2))


def _check_square(m: Tensor) -> None:
    if m.dim() != 3 or m.shape[-1] != m.shape[-2]:
        raise ValueError(f"expected (B, d, d) matrices, got shape {tuple(m.shape)}")


# ---------------------------------------------------------------------------------------------
# Eigendecomposition-based matrix functions with the K-matrix backward
# ---------------------------------------------------------------------------------------------
def _eig_spectrum(sigma: Tensor):
    """Eigendecomposition with numerically-zero eigenvalues clamped to exactly 0.

    Eigenvalues at or below d·eps·λ_max (the O2P rule, "keep eigenvalues > D·eps(max)") are
    rounding noise of a rank-deficient matrix; they are set to 0 and marked as not kept.
    Returns (λ clamped (B, d), U (B, d, d), kept mask (B, d), cutoff (B, 1)).
    """
    lam, u = torch.linalg.eigh(sym(sigma))
    d = sigma.shape[-1]
    lam_max = lam.amax(dim=-1, keepdim=True).clamp_min(0)
    cutoff = (d * torch.finfo(lam.dtype).eps * lam_max).clamp_min(torch.finfo(lam.dtype).tiny)
    kept = lam > cutoff
    return torch.where(kept, lam, torch.zeros_like(lam)), u, kept, cutoff


def _spectral_map(lam: Tensor, kept: Tensor, kind: str, alpha: float, eps: float):
    """f(λ) and f'(λ) of the spectral function; f' is 0 for eigenvalues that were clamped."""
    shifted = lam + eps
    if kind == "power":
        # Clamped eigenvalues with eps = 0 map to 0^α = 0; their derivative α·0^(α-1) is not used.
        safe = torch.where(shifted > 0, shifted, torch.ones_like(shifted))
        value = torch.where(shifted > 0, safe.pow(alpha), torch.zeros_like(shifted))
        slope = alpha * safe.pow(alpha - 1)
    elif kind == "log":
        value = torch.log(shifted)
        slope = 1.0 / shifted
    else:
        raise ValueError(f"unknown spectral function {kind!r}")
    return value, torch.where(kept, slope, torch.zeros_like(slope))


def _spectral_forward(sigma: Tensor, kind: str, alpha: float, eps: float):
    lam, u, kept, cutoff = _eig_spectrum(sigma)
    value, slope = _spectral_map(lam, kept, kind, alpha, eps)
    return u @ torch.diag_embed(value) @ u.transpose(-1, -2), (lam, u, value, slope, cutoff)


def _spectral(sigma: Tensor, kind: str, alpha: float, eps: float) -> Tensor:
    if torch.is_grad_enabled() and sigma.requires_grad:
        return _SymmetricEigFunction.apply(sigma, kind, alpha, eps)
    return _spectral_forward(sigma, kind, alpha, eps)[0]  # inference and tracing: no autograd.Function


class _SymmetricEigFunction(torch.autograd.Function):
    """Q = U f(Λ) Uᵀ with the backward of Ionescu et al. (ICCV 2015):

        ∂l/∂U = (G + Gᵀ) U f(Λ),  ∂l/∂Λ = f'(Λ) (Uᵀ G U)_diag,
        ∂l/∂Σ = U { sym(Kᵀ ∘ (Uᵀ ∂l/∂U)) + (∂l/∂Λ)_diag } Uᵀ,
        K_ij = 1 / (λ_i − λ_j) for i ≠ j.

    K entries of equal (or numerically equal) eigenvalues are set to 0, never ±inf: this is the
    rule of the MPN-COV code, and it keeps the gradient finite on repeated eigenvalues.
    """

    @staticmethod
    def forward(ctx, sigma, kind, alpha, eps):
        out, saved = _spectral_forward(sigma, kind, alpha, eps)
        ctx.save_for_backward(*saved)
        return out

    @staticmethod
    def backward(ctx, grad):
        lam, u, value, slope, cutoff = ctx.saved_tensors
        diff = lam.unsqueeze(-1) - lam.unsqueeze(-2)  # λ_i − λ_j
        distinct = diff.abs() > cutoff.unsqueeze(-1)
        k = torch.where(distinct, 1.0 / torch.where(distinct, diff, torch.ones_like(diff)), torch.zeros_like(diff))
        ut_g_u = u.transpose(-1, -2) @ grad @ u
        ut_dl_du = (ut_g_u + ut_g_u.transpose(-1, -2)) * value.unsqueeze(-2)  # Uᵀ(G+Gᵀ)U f(Λ)
        inner = sym(k.transpose(-1, -2) * ut_dl_du) + torch.diag_embed(slope * ut_g_u.diagonal(dim1=-2, dim2=-1))
        return u @ inner @ u.transpose(-1, -2), None, None, None


@full_precision
def eig_power(sigma: Tensor, alpha: float = 0.5, eps: float = 0.0) -> Tensor:
    """Matrix power U (λ + ε)^α Uᵀ of symmetric PSD matrices (MPN-COV, G²DeNet).

    Eigenvalues at or below d·eps(λ_max) count as 0 (rank-deficient covariances, M < C).

    Args:
        sigma: (B, d, d) symmetric positive semi-definite matrices.
        alpha: the power (½ in MPN-COV and G²DeNet).
        eps: added to every eigenvalue (0 in the MPN-COV README, 1e-3 in G²DeNet).
    Returns:
        (B, d, d) symmetric matrices.
    """
    _check_square(sigma)
    if eps < 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    return _spectral(sigma, "power", float(alpha), float(eps))


@full_precision
def eig_log(sigma: Tensor, eps: float = 1e-3) -> Tensor:
    """Matrix logarithm log(Σ + εI) = U log(λ + ε) Uᵀ of symmetric PSD matrices (DeepO2P).

    Args:
        sigma: (B, d, d) symmetric positive semi-definite matrices.
        eps: > 0; the regulariser that makes Σ + εI positive definite.
    Returns:
        (B, d, d) symmetric matrices.
    """
    _check_square(sigma)
    if not eps > 0:
        raise ValueError(f"the matrix logarithm needs eps > 0 (log 0 is -inf), got {eps}")
    return _spectral(sigma, "log", 1.0, float(eps))


# ---------------------------------------------------------------------------------------------
# Improved B-CNN: Newton–Schulz forward, Lyapunov backward
# ---------------------------------------------------------------------------------------------
def _coupled_newton_schulz(a: Tensor, iterations: int) -> Tensor:
    """Y_N of the coupled iteration Y₀ = A, Z₀ = I, T = ½(3I − ZY), Y ← YT, Z ← TZ."""
    eye3 = 3.0 * torch.eye(a.shape[-1], dtype=a.dtype, device=a.device)
    y, z = a, torch.eye(a.shape[-1], dtype=a.dtype, device=a.device).expand_as(a)
    for _ in range(iterations):
        t = 0.5 * (eye3 - z @ y)
        y, z = y @ t, t @ z
    return y


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
    norm = _safe_normaliser(torch.linalg.matrix_norm(z)).view(-1, 1, 1)
    a, q = z / norm, g / norm
    for _ in range(iterations):
        a2 = a @ a
        at = a.transpose(-1, -2)
        q = 0.5 * (q @ (eye3 - a2) - at @ (at @ q - q @ a))
        a = 0.5 * a @ (eye3 - a2)
    return 0.5 * q


class _NewtonSchulzLyapunov(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, iterations, backward_iterations):
        y = _coupled_newton_schulz(a, iterations)
        ctx.save_for_backward(y)
        ctx.backward_iterations = backward_iterations
        return y

    @staticmethod
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
    _check_square(sigma)
    norm = _safe_normaliser(torch.linalg.matrix_norm(sigma)).view(-1, 1, 1)
    a = sigma / norm
    if torch.is_grad_enabled() and a.requires_grad:
        root = _NewtonSchulzLyapunov.apply(a, iterations, backward_iterations)
    else:  # inference and export: the same forward without the autograd.Function
        root = _coupled_newton_schulz(a, iterations)
    return root * norm.sqrt()


# ---------------------------------------------------------------------------------------------
# Eigendecomposition-free substitutes (ONNX has no eigendecomposition)
# ---------------------------------------------------------------------------------------------
def _root_schedule(iterations: int, roots: int):
    """Newton–Schulz iterations for the j-th of successive square roots.

    Each iteration multiplies a small eigenvalue's root estimate by about 1.5 until it converges
    (~5 more iterations). The j-th root starts from a matrix whose condition number is κ^(1/2^j),
    so its growth phase is 2^j times shorter: 5 + ⌈(N − 5)/2^j⌉ iterations.
    """
    return [5 + math.ceil(max(iterations - 5, 0) / 2 ** j) for j in range(roots)]


def _unit_frobenius(m: Tensor):
    """(M/‖M‖_F, ‖M‖_F): eigenvalues of the PSD M/‖M‖_F lie in [0, 1], where plain Newton–Schulz converges."""
    norm = _safe_normaliser(torch.linalg.matrix_norm(m)).view(-1, 1, 1)
    return m / norm, norm


@full_precision
def powm_newton_schulz(sigma: Tensor, alpha: float = 0.5, eps: float = 0.0, iterations: int = 20) -> Tensor:
    """(Σ + εI)^α for α = 2^-k by k Newton–Schulz square roots; the export substitute of :func:`eig_power`.

    Σ + εI is scaled to unit Frobenius norm, its k-th root taken by k coupled Newton–Schulz square
    roots (``iterations`` for the first, fewer for the better-conditioned later ones), and rescaled.
    """
    _check_square(sigma)
    roots, power = 0, 1.0
    while power > alpha and roots < 8:
        power /= 2
        roots += 1
    if power != alpha:
        raise ValueError(f"the Newton–Schulz substitute computes powers 2^-k only (0.5, 0.25, ...), got alpha={alpha}")
    m = sigma + eps * torch.eye(sigma.shape[-1], dtype=sigma.dtype, device=sigma.device) if eps else sigma
    root, norm = _unit_frobenius(sym(m))
    for steps in _root_schedule(iterations, roots):
        root = _coupled_newton_schulz(sym(root), steps)
    return root * norm.pow(alpha)


@full_precision
def logm_newton_schulz(sigma: Tensor, eps: float = 1e-3, roots: int = 6, iterations: int = 22,
                       terms: int = 12) -> Tensor:
    """log(Σ + εI) without an eigendecomposition, by inverse scaling and squaring.

    With c = ‖Σ + εI‖_F and B = (Σ + εI)/c (eigenvalues in (0, 1]):
    log(Σ + εI) = log(c)·I + 2^k · log(B^{1/2^k}). The k square roots use coupled Newton–Schulz
    (``iterations`` for the first, fewer for the better-conditioned later ones), and log(I + X) is its
    Mercator series to ``terms`` terms (after 6 roots of a matrix with κ = 10⁶, ‖X‖ < 0.2).
    Accuracy depends on the spectrum; :func:`finegrained.export` measures and reports it.

    Args:
        sigma: (B, d, d) symmetric positive semi-definite.
    Returns:
        (B, d, d) approximation of log(Σ + εI).
    """
    _check_square(sigma)
    if not eps > 0:
        raise ValueError(f"the matrix logarithm needs eps > 0, got {eps}")
    eye = torch.eye(sigma.shape[-1], dtype=sigma.dtype, device=sigma.device)
    root, scale = _unit_frobenius(sym(sigma + eps * eye))
    for steps in _root_schedule(iterations, roots):
        root = _coupled_newton_schulz(sym(root), steps)
    x = root - eye
    power, series = x, x.clone()
    for j in range(2, terms + 1):
        power = power @ x
        series = series + ((-1) ** (j + 1) / j) * power
    return (2 ** roots) * series + torch.log(scale) * eye


# ---------------------------------------------------------------------------------------------
# Random feature maps of polynomial kernels
# ---------------------------------------------------------------------------------------------
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
def tensor_sketch(x: Tensor, sketches, orders: int = 2):
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
    x = _positions(x).transpose(1, 2)  # (B, M, C)
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
    x = _positions(x).transpose(1, 2)  # (B, M, C)
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
def random_maclaurin(x: Tensor, w1: Tensor, w2: Tensor) -> Tensor:
    """Random Maclaurin features of the degree-2 polynomial kernel, averaged over positions.

    y = (1/M) Σ_m (x_m W₁) ∘ (x_m W₂) / √d with Rademacher W₁, W₂ (C, d): E⟨y(x), y(z)⟩ = ⟨x, z⟩²
    for single positions (Kar & Karnick, AISTATS 2012; Gao et al., CVPR 2016).

    Args:
        x: (B, C, H, W) or (B, C, M). w1, w2: (C, d).
    Returns:
        (B, d).
    """
    x = _positions(x).transpose(1, 2)
    return ((x @ w1) * (x @ w2)).mean(dim=1) / w1.shape[1] ** 0.5


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
        trace = _safe_normaliser(_batch_trace(scatter).div_(m))  # tr Σ
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
    x = _positions(x)
    if iterations < 1:
        raise ValueError(f"iterations must be >= 1, got {iterations}")
    if torch.is_grad_enabled() and x.requires_grad:
        return _ISqrtCov.apply(x, iterations)
    return sqrtm_newton_schulz(covariance(x), iterations)
