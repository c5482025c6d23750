"""SoT, DropCov, iSICE and MPA-Lya against their formulas written plainly in float64 (docs/methods/{sot,dropcov,isice,mpa}.md)."""
import numpy as np
import pytest
import torch
from torch.autograd import gradcheck

from finegrained.heads import build_head
from finegrained.ops import inv_newton_schulz, sqrtm_pade, sparse_inverse_covariance


def _generator(seed=0):
    return torch.Generator().manual_seed(seed)


def _triu_rows(m):
    d = m.shape[-1]
    return torch.stack([torch.cat([m[i, r, r:] for r in range(d)]) for i in range(m.shape[0])])


def _cov(x):
    """(B, C, H, W) -> (B, C, C), mean-centred, divided by M: written per sample with a sum of outer products."""
    flat = x.flatten(2)
    out = []
    for sample in flat:
        mu = sample.mean(dim=1, keepdim=True)
        cols = sample - mu
        out.append(sum(torch.outer(cols[:, i], cols[:, i]) for i in range(cols.shape[1])) / cols.shape[1])
    return torch.stack(out)


# -- SoT ------------------------------------------------------------------------------------------------
def _sot_plainly(head, feature_map, class_token=None):
    """MGCrP + svPN per sample and per head with explicit loops (SoT's multi_head_pooling + svPN)."""
    w = head.projection.weight  # (2·h·r, D), output units laid out [Q/K][head][r]
    h, r = head.heads, head.rank
    rows = []
    for b in range(feature_map.shape[0]):
        tokens = feature_map[b].flatten(1).T  # (N, D)
        n = tokens.shape[0]
        projected = tokens @ w.T  # (N, 2hr)
        parts = []
        for j in range(h):
            q = projected[:, j * r:(j + 1) * r]
            k = projected[:, h * r + j * r: h * r + (j + 1) * r]
            q, k = q - q.mean(), k - k.mean()
            p = q.T @ k / n
            v0 = head.start
            u = p @ v0
            u = u / u.norm()
            v = p.T @ u
            v = v / v.norm()
            sigma = u @ p @ v
            y = sigma ** 0.5 * torch.outer(u, v) + (p - sigma * torch.outer(u, v)) / (sigma ** 0.5 + 1e-5)
            parts.append(y.reshape(-1))
        z = torch.cat(parts)
        rows.append(z if class_token is None else torch.cat([z, class_token[b]]))
    return torch.stack(rows)


@pytest.mark.parametrize("with_class_token", [False, True])
def test_sot_matches_mgcrp_and_svpn_written_plainly(with_class_token):
    g = _generator()
    head = build_head("sot", 12, class_token_dim=12 if with_class_token else 0, heads=3, rank=4).double().eval()
    x = torch.randn(2, 12, 3, 4, generator=g, dtype=torch.float64)
    cls = torch.randn(2, 12, generator=g, dtype=torch.float64) if with_class_token else None
    out = head((x, cls) if with_class_token else x)
    assert out.shape == (2, 3 * 16 + (12 if with_class_token else 0)) == (2, head.output_dim)
    torch.testing.assert_close(out, _sot_plainly(head, x, cls), rtol=1e-10, atol=1e-12)


def test_sot_defaults_are_sot_small_and_fusion_is_sum_fc():
    head = build_head("sot", 384, class_token_dim=384)
    assert (head.heads, head.rank, head.output_dim) == (6, 24, 3456 + 384)
    assert isinstance(head.dropout, torch.nn.Dropout) and head.dropout.p == 0.5
    assert head.projection.bias is None and head.projection.out_features == 2 * 6 * 24
    # A linear classifier on [z, cls] is visual_fc(z) + cls_fc(cls): SoT's sum_fc.
    g = _generator(1)
    z, cls = torch.randn(2, 3456, generator=g), torch.randn(2, 384, generator=g)
    fc = torch.nn.Linear(3456 + 384, 5)
    visual, token = fc.weight[:, :3456], fc.weight[:, 3456:]
    torch.testing.assert_close(fc(torch.cat([z, cls], 1)), z @ visual.T + cls @ token.T + fc.bias)


def test_sot_gradcheck_with_class_token():
    g = _generator(2)
    head = build_head("sot", 6, class_token_dim=6, heads=2, rank=3, dropout=0.0).double()
    x = torch.randn(1, 6, 3, 3, generator=g, dtype=torch.float64).requires_grad_(True)
    cls = torch.randn(1, 6, generator=g, dtype=torch.float64).requires_grad_(True)
    assert gradcheck(lambda a, c: head((a, c)), (x, cls))


def test_sot_refuses_a_missing_class_token():
    head = build_head("sot", 8, class_token_dim=8, heads=2, rank=3)
    with pytest.raises(ValueError, match="class token"):
        head(torch.randn(1, 8, 2, 2))


# -- DropCov -------------------------------------------------------------------------------------------
def test_dropcov_evaluation_is_the_plain_covariance():
    g = _generator(3)
    head = build_head("dropcov", 10, reduction=None).double().eval()
    x = torch.randn(2, 10, 4, 5, generator=g, dtype=torch.float64)
    out = head(x)
    assert out.shape == (2, 55)
    assert (out - _triu_rows(_cov(x))).abs().max() <= 1e-9


def test_dropcov_training_follows_its_formulas():
    """ω = softmax(ECA(GAP)), X′ = X(1+ω), p from the cosine with Σ(X′)·1, channels dropped at rate p."""
    g = _generator(4)
    d = 16
    head = build_head("dropcov", d, reduction=None).double().train()
    # Anti-correlated channel pairs: small covariance row sums, hence a low cosine and a rate above 0
    # (independent channels give cosines near 1 and p clamped to 0).
    base = torch.randn(3, d // 2, 4, 4, generator=g, dtype=torch.float64)
    x = torch.cat([base, -base + 0.5 * torch.randn(3, d // 2, 4, 4, generator=g, dtype=torch.float64)], 1)
    torch.manual_seed(7)
    out = head(x)
    kernel = head.attention.weight.detach().view(-1)
    pooled = x.mean(dim=(2, 3))
    padded = torch.nn.functional.pad(pooled, (1, 1))
    response = torch.stack([sum(kernel[j] * padded[:, c + j] for j in range(3)) for c in range(d)], dim=1)
    omega = torch.exp(response) / torch.exp(response).sum(dim=1, keepdim=True)
    scaled = x * (1 + omega)[:, :, None, None]
    row_sums = _cov(scaled).sum(dim=2)
    cosine = (omega * row_sums).sum(1) / (omega.norm(dim=1) * row_sums.norm(dim=1))
    p = min(max(1 - 10 / np.log2(d) * cosine.mean().item(), 0.0), 1.0)
    assert head.last_drop_rate.item() == pytest.approx(p, abs=1e-12)
    torch.manual_seed(7)
    mask = torch.bernoulli(torch.full((3, d, 1, 1), 1 - p, dtype=torch.float64))
    expected = _triu_rows(_cov(scaled * mask / (1 - p)))
    assert 0 < p < 1 and 0 < mask.sum() < mask.numel()  # the case tests a real drop
    assert (out - expected).abs().max() <= 1e-9 * expected.abs().max()


def test_dropcov_gradcheck_in_training():
    g = _generator(5)
    head = build_head("dropcov", 6, reduction=None).double().train()
    x = torch.rand(2, 6, 3, 3, generator=g, dtype=torch.float64).requires_grad_(True)

    def seeded(t):
        torch.manual_seed(0)  # the same channel mask on every evaluation
        return head(t)

    assert gradcheck(seeded, (x,))


# -- iSICE -----------------------------------------------------------------------------------------------
def _ns_inverse_plainly(a, iterations):
    eye = torch.eye(a.shape[-1], dtype=a.dtype)
    out = []
    for m in a:
        t = torch.trace(m)
        y, z = m / t, eye
        for _ in range(iterations):
            step = 0.5 * (3 * eye - z @ y)
            y, z = y @ step, step @ z
        out.append(z @ z / t)
    return torch.stack(out)


def _isice_plainly(x, lam=0.01, eta=1.0, n=5, ns=7, ridge=1e-9):
    c = _cov(x)
    c = c / torch.einsum("bii->b", c).view(-1, 1, 1)
    c = 0.5 * (c + c.transpose(1, 2))
    e = ridge * torch.eye(c.shape[-1], dtype=c.dtype)
    p = _ns_inverse_plainly(c + e, ns)
    for i in range(n):
        pos, neg = p.clamp_min(0), (-p).clamp_min(0)
        grad = c - _ns_inverse_plainly(p + e, ns)
        f = 1 - i / (n - 1)
        pos = (pos - eta * f * (grad + lam)).clamp_min(0)
        neg = (neg - eta * f * (-grad + lam)).clamp_min(0)
        p = 0.5 * ((pos - neg) + (pos - neg).transpose(1, 2))
    return _triu_rows(p / torch.einsum("bii->b", p).sqrt().view(-1, 1, 1))


def test_isice_matches_the_projected_gradient_written_plainly():
    g = _generator(6)
    head = build_head("isice", 8, reduction=None).double()
    x = torch.rand(2, 8, 5, 5, generator=g, dtype=torch.float64)
    out, expected = head(x), _isice_plainly(x)
    assert out.shape == (2, 36)
    assert (out - expected).abs().max() <= 1e-10 * expected.abs().max()


def test_isice_without_sparsity_keeps_the_inverse():
    """λ = 0 and converged inverses: P = C⁻¹ is a fixed point (G = C − P⁻¹ = 0)."""
    g = _generator(7)
    x = torch.rand(2, 5, 6, 6, generator=g, dtype=torch.float64)
    c = _cov(x)
    c = c / torch.einsum("bii->b", c).view(-1, 1, 1)
    p = sparse_inverse_covariance(c, sparsity=0.0, inverse_iterations=40)
    torch.testing.assert_close(p, torch.linalg.inv(c), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(inv_newton_schulz(c, 40), torch.linalg.inv(c), rtol=1e-9, atol=1e-9)


def test_isice_sparsity_shrinks_the_off_diagonal():
    g = _generator(8)
    x = torch.rand(2, 6, 6, 6, generator=g, dtype=torch.float64)
    c = _cov(x)
    c = c / torch.einsum("bii->b", c).view(-1, 1, 1)
    off = ~torch.eye(6, dtype=torch.bool)
    dense = sparse_inverse_covariance(c, sparsity=0.0)[:, off].abs().sum()
    sparse = sparse_inverse_covariance(c, sparsity=1.0)[:, off].abs().sum()
    assert sparse < dense


# -- MPA-Lya / MTP-Lya -------------------------------------------------------------------------------------
PADE_P = [1, -11 / 4, 11 / 4, -77 / 64, 55 / 256, -11 / 1024]  # KingJamesSong/FastDifferentiableMatSqrt torch_utils.py
PADE_Q = [1, -9 / 4, 7 / 4, -35 / 64, 15 / 256, -1 / 1024]
TAYLOR = [1, -1 / 2, -1 / 8, -1 / 16, -5 / 128, -7 / 256, -21 / 1024, -33 / 2048, -429 / 32768, -715 / 65536,
          -2431 / 262144]


def _spd(batch, d, seed, floor=0.0):
    g = _generator(seed)
    a = torch.randn(batch, d, 2 * d, generator=g, dtype=torch.float64)
    return a @ a.transpose(1, 2) / (2 * d) + floor * torch.eye(d, dtype=torch.float64)


def _scalar_map_by_eigh(sigma, fn):
    """Apply the scalar approximant to the eigenvalues of Σ/‖Σ‖_F, compensate by √‖Σ‖_F."""
    norm = torch.linalg.matrix_norm(sigma).view(-1, 1, 1)
    lam, u = torch.linalg.eigh(sigma / norm)
    return u @ torch.diag_embed(fn(1 - lam)) @ u.transpose(1, 2) * norm.sqrt()


def _poly(coefficients, z):
    return sum(c * z ** k for k, c in enumerate(coefficients))


@pytest.mark.parametrize("method,scalar", [
    ("mpa", lambda z: _poly(PADE_P, z) / _poly(PADE_Q, z)), ("mtp", lambda z: _poly(TAYLOR, z))])
def test_pade_and_taylor_match_their_scalar_formulas(method, scalar):
    sigma = _spd(3, 12, seed=9)
    out = sqrtm_pade(sigma, method)
    expected = _scalar_map_by_eigh(sigma, scalar)
    assert (out - expected).abs().max() <= 1e-6 * expected.abs().max()
    assert (out - expected).abs().max() <= 1e-12  # in fact to rounding


def _exact_root(sigma):
    lam, u = torch.linalg.eigh(sigma)
    return u @ torch.diag_embed(lam.sqrt()) @ u.transpose(1, 2)


@pytest.mark.parametrize("d", [4, 10])
def test_mpa_is_closer_to_the_exact_root_than_mtp(d):
    """Both approximate √(1 − z) around z = 0; after Frobenius normalisation the eigenvalues of Σ/‖Σ‖_F are
    about 1/√d, so both lose accuracy as d grows (the published methods do too), MPA far less."""
    sigma = _spd(2, d, seed=10, floor=1.0)
    exact = _exact_root(sigma)
    mpa_err = float((sqrtm_pade(sigma, "mpa") - exact).abs().max() / exact.abs().max())
    mtp_err = float((sqrtm_pade(sigma, "mtp") - exact).abs().max() / exact.abs().max())
    assert mpa_err < 1e-3 and mpa_err < mtp_err / 20


def _lyapunov_solution(root, g):
    """X with S X + X S = G, by eigendecomposition of S: X = U (UᵀGU / (s_i + s_j)) Uᵀ."""
    s, u = torch.linalg.eigh(root)
    return u @ ((u.transpose(1, 2) @ g @ u) / (s[:, :, None] + s[:, None, :])) @ u.transpose(1, 2)


def test_lyapunov_sign_iteration_solves_the_equation():
    """8 coupled sign iterations from the normalised root (eigenvalues in (0, 1]) solve S X + X S = G."""
    from finegrained.ops import lyapunov_newton_schulz

    root = _exact_root(_spd(2, 10, seed=11, floor=0.5))
    root = root / torch.linalg.matrix_norm(root).view(-1, 1, 1) * 2.0  # eigenvalues about 0.6
    g = torch.randn(2, 10, 10, generator=_generator(12), dtype=torch.float64)
    x = lyapunov_newton_schulz(root, g, 8, normalise=False)
    torch.testing.assert_close(x, _lyapunov_solution(root, g), rtol=1e-9, atol=1e-11)


def test_mpa_gradient_is_the_square_root_derivative():
    """The gradient of sqrtm_pade is that of the exact square root (Daleckii–Krein), up to the forward's own
    Padé error at this size."""
    sigma = _spd(2, 4, seed=11, floor=1.0).requires_grad_(True)
    g = torch.randn(2, 4, 4, generator=_generator(12), dtype=torch.float64)
    (grad,) = torch.autograd.grad((sqrtm_pade(sigma, "mpa") * g).sum(), sigma)
    lam, u = torch.linalg.eigh(sigma.detach())
    roots = lam.sqrt()
    k = 1.0 / (roots[:, :, None] + roots[:, None, :])  # (√λi − √λj)/(λi − λj)
    expected = u @ (k * (u.transpose(1, 2) @ g @ u)) @ u.transpose(1, 2)
    assert (grad - expected).abs().max() <= 1e-4 * expected.abs().max()


def test_mpa_head_exports_its_substitute_and_mtp_needs_none():
    head = build_head("mpa", 8, reduction=None).eval()
    assert "Newton" in head.export_substitute()
    assert build_head("mpa", 8, reduction=None, method="mtp").export_substitute() is None
    x = torch.rand(2, 8, 6, 6, generator=_generator(13))
    exact = head(x)
    head.use_substitute = True
    substitute = head(x)
    assert (substitute - exact).abs().max() <= 1e-5 * exact.abs().max()  # the same Padé form, matmuls only


def test_mpa_refuses_an_unknown_method_when_built():
    with pytest.raises(ValueError, match=r"head 'mpa': method must be one of \('mpa', 'mtp'\), got 'xx'"):
        build_head("mpa", 8, reduction=None, method="xx")
