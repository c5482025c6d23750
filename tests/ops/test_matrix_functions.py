"""Matrix functions against independent float64 references, plus gradcheck."""
import math

import numpy as np
import pytest
import torch
from torch.autograd import gradcheck

from finegrained.ops import covariance, gram, signed_sqrt, sqrtm_newton_schulz, triu_vec

torch.manual_seed(0)


def random_spd(batch, d, low=0.5, high=1.5, dtype=torch.float64):
    """SPD matrices with eigenvalues in [low, high] (well conditioned)."""
    q, _ = torch.linalg.qr(torch.randn(batch, d, d, dtype=dtype))
    lam = torch.empty(batch, d, dtype=dtype).uniform_(low, high)
    return q @ torch.diag_embed(lam) @ q.transpose(1, 2)


def eig_sqrt(m):
    lam, u = torch.linalg.eigh(m)
    return u @ torch.diag_embed(lam.clamp_min(0).sqrt()) @ u.transpose(1, 2)


def plain_newton_schulz(sigma, n):
    """The iteration exactly as written in the paper, no shortcuts."""
    d = sigma.shape[-1]
    eye = torch.eye(d, dtype=sigma.dtype).expand_as(sigma)
    tr = sigma.diagonal(dim1=1, dim2=2).sum(-1).view(-1, 1, 1)
    y, z = sigma / tr, eye
    for _ in range(n):
        t = 0.5 * (3 * eye - z @ y)
        y, z = y @ t, t @ z
    return tr.sqrt() * y


@pytest.mark.parametrize("shape", [(2, 5, 4, 3), (3, 16, 7, 7), (1, 8, 1, 9)])
def test_covariance_matches_numpy(shape):
    x = torch.randn(*shape, dtype=torch.float64)
    sigma = covariance(x)
    for b in range(shape[0]):
        ref = np.cov(x[b].reshape(shape[1], -1).numpy(), bias=True)
        np.testing.assert_allclose(sigma[b].numpy(), ref, rtol=1e-12, atol=1e-12)


def test_gram_is_uncentred_second_moment():
    x = torch.randn(2, 6, 3, 5, dtype=torch.float64)
    flat = x.flatten(2)
    ref = torch.einsum("bcm,bdm->bcd", flat, flat) / flat.shape[-1]
    torch.testing.assert_close(gram(x), ref)


@pytest.mark.parametrize("d", [4, 16, 32])
def test_newton_schulz_converges_to_eigen_sqrt(d):
    # Trace normalisation puts A's eigenvalues near 1/d; with enough iterations NS converges.
    sigma = random_spd(3, d)
    approx = sqrtm_newton_schulz(sigma, iterations=40)
    torch.testing.assert_close(approx, eig_sqrt(sigma), rtol=1e-9, atol=1e-9)


def test_newton_schulz_five_steps_on_small_well_conditioned_matrices():
    # With d = 3 and a flat spectrum, Σ/trΣ has eigenvalues near 1/3: the paper's N = 5 suffices.
    sigma = random_spd(4, 3, low=0.9, high=1.1)
    sigma_scaled = sigma * 7.0
    approx = sqrtm_newton_schulz(sigma_scaled, iterations=5)
    torch.testing.assert_close(approx, eig_sqrt(sigma_scaled), rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("n", [1, 2, 3, 5, 8])
def test_newton_schulz_equals_plain_iteration(n):
    sigma = covariance(torch.randn(2, 12, 5, 5, dtype=torch.float64))
    torch.testing.assert_close(sqrtm_newton_schulz(sigma, n), plain_newton_schulz(sigma, n),
                               rtol=1e-12, atol=1e-12)


def test_newton_schulz_zero_matrix_is_zero_not_nan():
    out = sqrtm_newton_schulz(torch.zeros(2, 5, 5))
    assert torch.isfinite(out).all() and (out == 0).all()


def test_newton_schulz_rejects_bad_input():
    with pytest.raises(ValueError, match="iterations"):
        sqrtm_newton_schulz(torch.eye(3)[None], iterations=0)
    with pytest.raises(ValueError, match=r"\(B, d, d\)"):
        sqrtm_newton_schulz(torch.ones(2, 3, 4))


def test_triu_vec_order_and_size():
    d = 5
    m = torch.arange(2 * d * d, dtype=torch.float64).view(2, d, d)
    v = triu_vec(m)
    assert v.shape == (2, d * (d + 1) // 2)
    expected = [[m[b, i, j].item() for i in range(d) for j in range(i, d)] for b in range(2)]
    assert v.tolist() == expected
    rows, cols = torch.triu_indices(d, d)
    torch.testing.assert_close(v, m[:, rows, cols])
    assert triu_vec(torch.zeros(1, 256, 256)).shape == (1, 32896)


def test_signed_sqrt_plain_formula():
    x = torch.tensor([-4.0, -1e-9, 0.0, 2.25], dtype=torch.float64)
    ref = torch.tensor([-np.sqrt(4 + 1e-5), -np.sqrt(1e-9 + 1e-5), 0.0, np.sqrt(2.25 + 1e-5)], dtype=torch.float64)
    torch.testing.assert_close(signed_sqrt(x), ref)


def test_gradcheck_covariance_and_gram():
    x = torch.randn(2, 4, 3, 3, dtype=torch.float64, requires_grad=True)
    assert gradcheck(covariance, (x,))
    assert gradcheck(gram, (x,))


@pytest.mark.parametrize("n", [1, 3, 5])
def test_gradcheck_newton_schulz(n):
    sigma = random_spd(2, 5).requires_grad_(True)
    assert gradcheck(lambda s: sqrtm_newton_schulz(s, n), (sigma,))


def test_gradcheck_triu_vec_and_signed_sqrt():
    m = torch.randn(2, 4, 4, dtype=torch.float64, requires_grad=True)
    assert gradcheck(triu_vec, (m,))
    x = (torch.randn(10, dtype=torch.float64) + 0.0).requires_grad_(True)
    assert gradcheck(signed_sqrt, (x,))


# ---- eigendecomposition functions with the K-matrix backward --------------------------------------
from finegrained.ops import (count_sketch_matrix, eig_log, eig_power, logm_newton_schulz,  # noqa: E402
                             lyapunov_newton_schulz, powm_newton_schulz, random_maclaurin,
                             sqrtm_newton_schulz_lyapunov, sym, tensor_sketch)


def eig_reference(m, f):
    lam, u = torch.linalg.eigh(m)
    return u @ torch.diag_embed(f(lam)) @ u.transpose(1, 2)


@pytest.mark.parametrize("fn,f", [
    (lambda s: eig_power(s, 0.5), torch.sqrt),
    (lambda s: eig_power(s, 0.3, 1e-2), lambda l: (l + 1e-2) ** 0.3),
    (lambda s: eig_log(s, 1e-3), lambda l: torch.log(l + 1e-3)),
])
def test_eig_functions_match_autograd_through_eigh(fn, f):
    sigma = random_spd(3, 6)
    s1, s2 = sigma.clone().requires_grad_(True), sigma.clone().requires_grad_(True)
    out, ref = fn(s1), eig_reference(sym(s2), f)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)
    upstream = torch.randn_like(ref)
    (g1,) = torch.autograd.grad((out * upstream).sum(), s1)
    (g2,) = torch.autograd.grad((ref * upstream).sum(), s2)
    torch.testing.assert_close(g1, g2, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("fn", [lambda s: eig_power(s, 0.5), lambda s: eig_power(s, 0.5, 1e-3),
                                lambda s: eig_log(s, 1e-2)])
def test_gradcheck_k_matrix_backward(fn):
    sigma = random_spd(2, 5).requires_grad_(True)
    assert gradcheck(fn, (sigma,))


def test_k_matrix_zeroes_equal_eigenvalues():
    """Σ = 2I has one repeated eigenvalue: K would be 1/0; the gradient must be finite and equal to
    the diagonal term only (f'(λ)·G's projection), as in the MPN-COV code."""
    sigma = (2.0 * torch.eye(4, dtype=torch.float64)).expand(2, 4, 4).clone().requires_grad_(True)
    out = eig_power(sigma, 0.5)
    torch.testing.assert_close(out, math.sqrt(2.0) * torch.eye(4, dtype=torch.float64).expand(2, 4, 4))
    g = torch.randn(2, 4, 4, dtype=torch.float64)
    (grad,) = torch.autograd.grad((out * g).sum(), sigma)
    assert torch.isfinite(grad).all()
    # With equal eigenvalues the kept part is f'(2)·diag-projection: U diag(f'(λ) (UᵀGU)_ii) Uᵀ.
    lam, u = torch.linalg.eigh(sigma.detach())
    inner = torch.diag_embed(0.5 / math.sqrt(2.0) * (u.transpose(1, 2) @ g @ u).diagonal(dim1=1, dim2=2))
    torch.testing.assert_close(grad, u @ inner @ u.transpose(1, 2))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_eig_functions_on_rank_deficient_and_zero_matrices(dtype):
    x = torch.randn(2, 8, 3, dtype=dtype)  # 3 positions, 8 channels: rank <= 2
    for sigma in (covariance(x), torch.zeros(2, 8, 8, dtype=dtype)):
        for fn in (lambda s: eig_power(s, 0.5), lambda s: eig_log(s, 1e-3)):
            s = sigma.clone().requires_grad_(True)
            out = fn(s)
            out.backward(torch.randn_like(out))
            assert torch.isfinite(out).all() and torch.isfinite(s.grad).all()
    torch.testing.assert_close(eig_power(covariance(x).double(), 0.5), eig_reference(covariance(x).double(),
                               lambda l: l.clamp_min(0).sqrt()), rtol=1e-6, atol=1e-6)


def test_eig_log_rejects_zero_eps():
    with pytest.raises(ValueError, match="eps > 0"):
        eig_log(torch.eye(3)[None], eps=0.0)


# ---- improved B-CNN: Lyapunov backward -------------------------------------------------------------
def test_lyapunov_solver_solves_the_equation():
    z = eig_sqrt(random_spd(2, 5))
    g = torch.randn(2, 5, 5, dtype=torch.float64)
    x = lyapunov_newton_schulz(z, g, iterations=40)
    torch.testing.assert_close(z @ x + x @ z, g, rtol=1e-9, atol=1e-9)


def test_gradcheck_lyapunov_backward():
    """The custom backward is the derivative of the forward once both iterations have converged."""
    sigma = random_spd(2, 4).requires_grad_(True)
    assert gradcheck(lambda s: sqrtm_newton_schulz_lyapunov(s, 30, 30), (sigma,))


def test_lyapunov_backward_differs_from_unrolled_forward_at_five_iterations():
    """Sanity: the default backward is the paper's Lyapunov solve, not autograd through the loop."""
    sigma = random_spd(1, 6, low=0.05, high=3.0).requires_grad_(True)
    g = torch.randn(1, 6, 6, dtype=torch.float64)
    (custom,) = torch.autograd.grad((sqrtm_newton_schulz_lyapunov(sigma) * g).sum(), sigma)
    norm = torch.linalg.matrix_norm(sigma).view(-1, 1, 1)
    from finegrained.ops import newton_schulz

    unrolled_out = newton_schulz(sigma / norm, 5) * norm.sqrt()
    (unrolled,) = torch.autograd.grad((unrolled_out * g).sum(), sigma)
    assert (custom - unrolled).abs().max() > 1e-6


def test_improved_sqrt_zero_matrix_is_finite():
    s = torch.zeros(2, 4, 4, requires_grad=True)
    out = sqrtm_newton_schulz_lyapunov(s)
    out.sum().backward()
    assert (out == 0).all() and torch.isfinite(s.grad).all()


# ---- eigendecomposition-free substitutes -----------------------------------------------------------
def test_newton_schulz_substitutes_match_eig():
    sigma = covariance(torch.relu(torch.randn(3, 16, 64, dtype=torch.float64)))
    torch.testing.assert_close(powm_newton_schulz(sigma, 0.5, 0.0, 20), eig_power(sigma, 0.5), rtol=1e-8, atol=1e-8)
    torch.testing.assert_close(powm_newton_schulz(sigma, 0.25, 1e-3, 30), eig_power(sigma, 0.25, 1e-3),
                               rtol=1e-8, atol=1e-8)
    torch.testing.assert_close(logm_newton_schulz(sigma, 1e-3), eig_log(sigma, 1e-3), rtol=1e-8, atol=1e-8)
    with pytest.raises(ValueError, match="2\\^-k"):
        powm_newton_schulz(sigma, 0.3)


# ---- random feature maps ---------------------------------------------------------------------------
def test_tensor_sketch_is_unbiased_for_the_squared_inner_product():
    """E⟨TS(x), TS(y)⟩ = ⟨x, y⟩² over the random hashes and signs (Pham & Pagh 2013)."""
    c, d, trials = 12, 16, 4000
    g = torch.Generator().manual_seed(0)
    x = torch.randn(c, dtype=torch.float64, generator=g)
    y = x + 0.5 * torch.randn(c, dtype=torch.float64, generator=g)
    pair = torch.stack([x, y])[:, :, None]  # (2, C, M=1)
    estimates = []
    for _ in range(trials):
        sketches = [count_sketch_matrix(c, d, g).double() for _ in range(2)]
        tx, ty = tensor_sketch(pair, sketches, orders=2)[0]
        estimates.append(float(tx @ ty))
    estimates = torch.tensor(estimates, dtype=torch.float64)
    truth = float(x @ y) ** 2
    stderr = estimates.std() / math.sqrt(trials)
    assert abs(estimates.mean() - truth) < 4 * stderr, (estimates.mean(), truth, stderr)
    # The estimator has real variance: a test of the mean that could not fail would be useless.
    assert estimates.std() > 0.05 * truth
    # Norms are estimated too: ⟨TS(x), TS(x)⟩ ≈ ‖x‖⁴ on average.
    assert abs(sum(float(tensor_sketch(pair[:1], [count_sketch_matrix(c, d, g).double() for _ in range(2)])[0][0]
                         .square().sum()) for _ in range(500)) / 500 / float(x @ x) ** 2 - 1) < 0.15


def test_random_maclaurin_is_unbiased():
    c, d = 6, 4096
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(2, c, 1, dtype=torch.float64, generator=g)
    w1 = (torch.randint(2, (c, d), generator=g) * 2 - 1).double()
    w2 = (torch.randint(2, (c, d), generator=g) * 2 - 1).double()
    fx, fy = random_maclaurin(torch.stack([x, y]), w1, w2)
    truth = float(x[:, 0] @ y[:, 0]) ** 2
    # A single draw with d = 4096 features: relative error ~ O(1/√d).
    assert abs(float(fx @ fy) - truth) < 0.15 * max(truth, 1.0)
