"""Heads against their authors' code: each reference below is transcribed from the official source it names (not
from this project's code), and compared in float64 on the same weights and inputs, forward and gradient."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from finegrained.heads import build_head



def _spd(b, d, seed, rank=None, floor=0.0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, d, rank or 3 * d, generator=g, dtype=torch.float64)
    return x @ x.transpose(1, 2) / x.shape[-1] + floor * torch.eye(d, dtype=torch.float64)


def _relative(a, b):
    return float((a - b).abs().max() / b.abs().max())


# ---- NetVLAD: α of the vladv2 weights (Relja/netvlad, addLayers.m) -------------------------------------------------
def test_netvlad_alpha_is_the_official_vladv2_rule():
    """addLayers.m, vladv2: [~, dsSq] = yael_nn(clsts, trainDescs, 2); alpha = -log(0.01)/mean(dsSq(2,:) - dsSq(1,:)),
    the squared distances of each descriptor to its two nearest centres; weights 2αc, biases −α‖c‖²."""
    from sklearn.neighbors import NearestNeighbors

    torch.manual_seed(0)
    head = build_head("netvlad", 16, clusters=8)
    centres = torch.randn(8, 16)
    features = (centres[torch.randint(8, (400,))] + 0.3 * torch.randn(400, 16)).T.reshape(1, 16, 20, 20)
    head.init_from_features(features)
    descriptors = F.normalize(features.flatten(2)[0].T.double(), dim=1).numpy()
    clusters = head.centroids.detach().double().numpy()
    distances, _ = NearestNeighbors(n_neighbors=2).fit(clusters).kneighbors(descriptors)
    squared = distances ** 2
    alpha = -math.log(0.01) / np.mean(squared[:, 1] - squared[:, 0])
    assert head.alpha == pytest.approx(alpha, rel=1e-6)
    torch.testing.assert_close(head.assign.weight[:, :, 0, 0].double(), torch.as_tensor(2 * alpha * clusters),
                               rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(head.assign.bias.double(), torch.as_tensor(-alpha * (clusters ** 2).sum(1)),
                               rtol=1e-6, atol=1e-5)
    # The nearest centre gets 100 times the weight of the second, in the mean of the exponent.
    logits = head.assign(F.normalize(features, dim=1)).flatten(2)[0].T.double()
    top2 = logits.topk(2, dim=1).values
    assert float((top2[:, 0] - top2[:, 1]).mean()) == pytest.approx(math.log(100), rel=1e-4)


# ---- GM-SOP: the load-balance loss (ZilinGao/GM-SOP, matlab/+dagnn/Balance_loss.m) --------------------------------
def test_gmsop_balance_loss_and_its_gradient_are_the_official_ones():
    """Balance_loss.m: w_sum = sum(input, 2); RSD = std(w_sum)/mean(w_sum) (MATLAB std: N − 1); loss = w·RSD²;
    derivative w_sum·2w/((N−1)m²) − 2w(1/(N−1) + RSD²/N)/m for every image of the batch."""
    from finegrained.heads.gmsop import load_balance_loss

    g = torch.Generator().manual_seed(0)
    gates = torch.rand(6, 16, generator=g, dtype=torch.float64).requires_grad_(True)
    loss = load_balance_loss(gates, 100.0)
    loss.backward()
    w_sum = gates.detach().sum(0).numpy()
    n, w, m = 16, 100.0, w_sum.mean()
    rsd = np.std(w_sum, ddof=1) / m
    assert float(loss) == pytest.approx(w * rsd ** 2, rel=1e-12)
    derivative = w_sum * 2 * w / ((n - 1) * m ** 2) - 2 * w * (1 / (n - 1) + rsd ** 2 / n) / m
    np.testing.assert_allclose(gates.grad.numpy(), np.tile(derivative, (6, 1)), rtol=1e-10, atol=1e-12)


def test_gmsop_component_convolutions_have_no_bias():
    """cnn_init_resnet_GM.m: the components' convolutions are Conv_nobn with bias = false; the gate's Conv + BN."""
    head = build_head("gmsop", 16, components=4, top_k=2, mid_channels=8, out_channels=4)
    convs = [m for m in head.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == 2 * 5 and all(conv.bias is None for conv in convs)
    assert all(conv.bias is None for conv in build_head("srsop", 16, mid_channels=8, out_channels=4).modules()
               if isinstance(conv, torch.nn.Conv2d))


# ---- improved B-CNN: msubhransu/matrix-sqrt, matrix_sqrt.py --------------------------------------------------------
def _matrix_sqrt_forward(a, iterations):
    """sqrt_newton_schulz: Y = A/‖A‖_F, Z = I; T = ½(3I − ZY), Y = YT, Z = TZ; sA = Y·√‖A‖_F."""
    norm = a.mul(a).sum(dim=1).sum(dim=1).sqrt().view(-1, 1, 1)
    eye = torch.eye(a.shape[1], dtype=a.dtype).expand_as(a)
    y, z = a / norm, eye
    for _ in range(iterations):
        t = 0.5 * (3.0 * eye - z.bmm(y))
        y, z = y.bmm(t), t.bmm(z)
    return y * norm.sqrt()


def _matrix_sqrt_backward(z, dldz, iterations):
    """lyap_newton_schulz: a = z/‖z‖_F, q = dldz/‖z‖_F;
    q = ½(q(3I − a²) − aᵀ(aᵀq − qa)), a = ½a(3I − a²); dlda = ½q."""
    normz = z.mul(z).sum(dim=1).sum(dim=1).sqrt().view(-1, 1, 1)
    a, q = z / normz, dldz / normz
    eye = torch.eye(z.shape[1], dtype=z.dtype).expand_as(z)
    for _ in range(iterations):
        q = 0.5 * (q.bmm(3.0 * eye - a.bmm(a)) - a.transpose(1, 2).bmm(a.transpose(1, 2).bmm(q) - q.bmm(a)))
        a = 0.5 * a.bmm(3.0 * eye - a.bmm(a))
    return 0.5 * q


class _MatrixSqrt(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, iterations):
        z = _matrix_sqrt_forward(a, iterations)
        ctx.save_for_backward(z)
        ctx.iterations = iterations
        return z

    @staticmethod
    def backward(ctx, g):
        (z,) = ctx.saved_tensors
        return _matrix_sqrt_backward(z, g, ctx.iterations), None


def test_improved_bcnn_square_root_and_gradient_are_the_official_ones():
    from finegrained.ops import sqrtm_newton_schulz_lyapunov

    sigma = _spd(3, 12, seed=1, floor=0.05).requires_grad_(True)
    g = torch.randn(3, 12, 12, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    ours = sqrtm_newton_schulz_lyapunov(sigma, 5, 5)
    (ours_grad,) = torch.autograd.grad((ours * g).sum(), sigma)
    reference = _MatrixSqrt.apply(sigma, 5)
    (reference_grad,) = torch.autograd.grad((reference * g).sum(), sigma)
    assert _relative(ours, reference) <= 1e-12
    assert _relative(ours_grad, reference_grad) <= 1e-6


def test_improved_bcnn_head_gradient_is_the_official_one():
    """The head (X Xᵀ/M, the square root, signed square root, l2) with the official square root in the middle."""
    x = torch.randn(2, 6, 4, 5, generator=torch.Generator().manual_seed(3), dtype=torch.float64).relu()
    head = build_head("improved_bcnn", 6)
    upstream = torch.randn(2, 36, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    xa = x.clone().requires_grad_(True)
    (ours,) = torch.autograd.grad((head(xa) * upstream).sum(), xa)
    xb = x.clone().requires_grad_(True)
    flat = xb.flatten(2)
    root = _MatrixSqrt.apply(flat @ flat.transpose(1, 2) / flat.shape[-1], 5)
    out = F.normalize(torch.sign(root.flatten(1)) * torch.sqrt(root.flatten(1).abs() + 1e-5), dim=1)
    (reference,) = torch.autograd.grad((out * upstream).sum(), xb)
    assert _relative(ours, reference) <= 1e-6


# ---- MPA-Lya: KingJamesSong/FastDifferentiableMatSqrt, torch_utils.py ----------------------------------------------
def _pade_coefficients():
    """pade(taylor(sqrt(1 − x), 0, 10), 5, 5), as torch_utils.py derives them with mpmath (here scipy)."""
    from scipy.interpolate import pade

    taylor = [1.0]
    for k in range(1, 11):
        taylor.append(taylor[-1] * (k - 1.5) / k)
    p, q = pade(taylor, 5, 5)
    return p.coeffs[::-1] / q.coeffs[-1], q.coeffs[::-1] / q.coeffs[-1]  # ascending powers, q_0 = 1


class _MPALya(torch.autograd.Function):
    """MPA_Lya: M/‖M‖_F -> matrix_pade_approximant (solve(Q, P)) -> × √‖M‖_F; backward b = M_sqrt/√‖M‖,
    c = grad/√‖M‖, 8 × {b2 = b b; c = ½(c(3I − b2) − b2 c + b c b); b = ½b(3I − b2)}, grad_input = ½c."""

    @staticmethod
    def forward(ctx, m):
        norm = torch.norm(m, dim=[1, 2]).reshape(m.size(0), 1, 1)
        eye = torch.eye(m.size(1), dtype=m.dtype).reshape(1, m.size(1), m.size(1)).repeat(m.size(0), 1, 1)
        pade_p, pade_q = _pade_coefficients()
        p_sqrt, q_sqrt = pade_p[0] * eye, pade_q[0] * eye
        p_app = eye - m / norm
        p_hat = p_app
        for i in range(5):
            p_sqrt = p_sqrt + pade_p[i + 1] * p_hat
            q_sqrt = q_sqrt + pade_q[i + 1] * p_hat
            p_hat = p_hat.bmm(p_app)
        m_sqrt = torch.linalg.solve(q_sqrt, p_sqrt) * torch.sqrt(norm)
        ctx.save_for_backward(m_sqrt, norm, eye)
        return m_sqrt

    @staticmethod
    def backward(ctx, grad_output):
        m_sqrt, norm, eye = ctx.saved_tensors
        b = m_sqrt / torch.sqrt(norm)
        c = grad_output / torch.sqrt(norm)
        for _ in range(8):
            b_2 = b.bmm(b)
            c = 0.5 * (c.bmm(3.0 * eye - b_2) - b_2.bmm(c) + b.bmm(c).bmm(b))
            b = 0.5 * b.bmm(3.0 * eye - b_2)
        return 0.5 * c


def test_mpa_lya_square_root_and_gradient_are_the_official_ones():
    from finegrained.ops import sqrtm_pade

    sigma = _spd(3, 16, seed=5, floor=0.01).requires_grad_(True)
    g = torch.randn(3, 16, 16, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    ours = sqrtm_pade(sigma, "mpa")
    (ours_grad,) = torch.autograd.grad((ours * g).sum(), sigma)
    reference = _MPALya.apply(sigma)
    (reference_grad,) = torch.autograd.grad((reference * g).sum(), sigma)
    assert _relative(ours, reference) <= 1e-10
    assert _relative(ours_grad, reference_grad) <= 1e-6


def test_mpa_lya_head_gradient_is_the_official_one():
    from finegrained.ops import covariance

    x = torch.randn(2, 8, 5, 5, generator=torch.Generator().manual_seed(7), dtype=torch.float64).relu()
    head = build_head("mpa", 8, reduction=None)
    upstream = torch.randn(2, 36, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    xa = x.clone().requires_grad_(True)
    (ours,) = torch.autograd.grad((head(xa) * upstream).sum(), xa)
    xb = x.clone().requires_grad_(True)
    root = _MPALya.apply(covariance(xb))
    rows, cols = torch.triu_indices(8, 8)
    (reference,) = torch.autograd.grad((root[:, rows, cols] * upstream).sum(), xb)
    assert _relative(ours, reference) <= 1e-6


# ---- CBP: the exported network computes the trained one, empty sketch bins included ---------------------------------
def test_cbp_export_path_has_the_eager_paths_exact_zeros():
    """C 32, d 1024: some bins receive no channel pair, and dead channels leave others at exactly 0; the signed
    square root sign(z)√(|z| + ε) would turn an FFT's ±1e-17 there into a 2√ε jump."""
    head = build_head("cbp", 32, output_dim=1024).eval()
    x = torch.randn(3, 32, 6, 6, generator=torch.Generator().manual_seed(9)).relu()
    x[:, :6] = 0  # dead channels
    with torch.no_grad():
        eager = head(x)
        traced = torch.jit.trace(head, x)(x)  # the export branch of the sketch
        sketch_eager = head.features(x)
    assert (sketch_eager == 0).any()
    assert float((eager - traced).abs().max()) <= 1e-6


def test_cbp_onnx_export_is_within_the_promised_tolerance(tmp_path):
    onnxruntime = pytest.importorskip("onnxruntime")
    head = build_head("cbp", 32, output_dim=1024).eval()
    x = torch.randn(2, 32, 6, 6, generator=torch.Generator().manual_seed(10)).relu()
    x[:, :6] = 0
    path = str(tmp_path / "cbp.onnx")
    torch.onnx.export(head, (x,), path, input_names=["x"], dynamo=True).save(path)
    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    exported = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        assert float(np.abs(exported - head(x).numpy()).max()) <= 1e-5


# ---- MPN-COV on rank-deficient covariances: exact, where the official EIG.m is not ---------------------------------
def _official_mpncov_gradient(sigma, g, alpha=0.5):
    """EIG.m keeps the eigenpairs with λ > eps(max λ) and zeroes the other eigenvectors; the backward (the MPN-COV
    paper's formula, mpn_cov_cpu.cpp) then runs on the kept ones only:
    ∂L/∂Σ = V{sym(Kᵀ ∘ (Vᵀ ∂L/∂V)) + (∂L/∂S)_diag}Vᵀ, ∂L/∂V = 2 sym(G) V f(S), ∂L/∂S = f'(S)(Vᵀ sym(G) V)."""
    lam, v = np.linalg.eigh(sigma)
    lam, v = lam[::-1].copy(), v[:, ::-1].copy()
    kept = lam > np.spacing(lam.max())
    lam, v = np.where(kept, lam, 0.0), v * kept
    f = np.where(kept, np.abs(lam) ** alpha, 0.0)
    fp = np.where(kept, alpha * np.abs(np.where(kept, lam, 1.0)) ** (alpha - 1), 0.0)
    gs = 0.5 * (g + g.T)
    dldv = 2 * gs @ v @ np.diag(f)
    dlds = np.diag(fp * np.diag(v.T @ gs @ v))
    diff = lam[:, None] - lam[None, :]
    k = np.where(kept[:, None] & kept[None, :] & (diff != 0), 1.0 / np.where(diff != 0, diff, 1.0), 0.0)
    inner = k.T * (v.T @ dldv)
    return v @ (0.5 * (inner + inner.T) + dlds) @ v.T


def test_mpncov_gradient_is_exact_on_rank_deficient_covariances_where_the_official_one_is_not():
    """Fewer positions (5) than channels (8): the exact derivative of Σ^{1/2} has cross terms between the range
    and the null space (divided differences λ_i^{-1/2}), which the official code drops. Checked against finite
    differences of the features (the covariance then moves as the network moves it)."""
    from finegrained.ops import covariance, eig_power

    x = torch.randn(1, 8, 5, generator=torch.Generator().manual_seed(11), dtype=torch.float64)
    g = torch.randn(1, 8, 8, generator=torch.Generator().manual_seed(12), dtype=torch.float64)
    direction = torch.randn(1, 8, 5, generator=torch.Generator().manual_seed(13), dtype=torch.float64)
    h = 1e-6

    def loss(features):
        return (eig_power(covariance(features), 0.5) * g).sum()

    finite = float(loss(x + h * direction) - loss(x - h * direction)) / (2 * h)
    xa = x.clone().requires_grad_(True)
    (ours,) = torch.autograd.grad(loss(xa), xa)
    xb = x.clone().requires_grad_(True)
    sigma = covariance(xb)
    official_sigma = torch.as_tensor(_official_mpncov_gradient(sigma[0].detach().numpy(), g[0].numpy()))[None]
    (official,) = torch.autograd.grad(sigma, xb, official_sigma)
    along = lambda grad: float((grad * direction).sum())  # noqa: E731
    assert along(ours) == pytest.approx(finite, rel=1e-5)
    assert abs(along(official) - finite) > 0.2 * abs(finite)  # 45 % here
