"""Matrix functions against independent float64 references, plus gradcheck."""
import numpy as np
import pytest
import torch
from torch.autograd import gradcheck

from finegrained.linalg import covariance, gram, signed_sqrt, sqrtm_newton_schulz, triu_vec

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
