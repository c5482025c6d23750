"""Every head against an independent float64 reference written plainly from its paper's formula.

Forward values and input gradients must agree to 1e-6 relative. Eigendecomposition heads are
checked against autograd through ``torch.linalg.eigh``; improved B-CNN's Lyapunov backward against
the sign iteration of the 2d×2d block matrix [[Z, G], [0, −Z]].
"""
import math

import pytest
import torch
import torch.nn.functional as F

from finegrained.heads import build_head
from finegrained.heads.gmsop import top_k_gates

torch.manual_seed(0)
TOL = 1e-6


def assert_rel(got, want, tol=TOL):
    scale = want.abs().max().clamp_min(1e-300)
    err = (got - want).abs().max() / scale
    assert err <= tol, f"relative error {err:.3g} > {tol}"


def check(head, reference, x, tol=TOL):
    """Forward and input-gradient parity of head(x) and reference(x), both float64."""
    head = head.double()
    x1 = x.clone().requires_grad_(True)
    x2 = x.clone().requires_grad_(True)
    out, ref = head(x1), reference(x2)
    assert out.shape == ref.shape
    assert_rel(out, ref, tol)
    upstream = torch.randn_like(ref)
    (g1,) = torch.autograd.grad((out * upstream).sum(), x1)
    (g2,) = torch.autograd.grad((ref * upstream).sum(), x2)
    assert_rel(g1, g2, tol)


# ---- plain building blocks (per image, loops, no project code) ---------------------------------
def columns(x_b):
    """(C, H, W) -> list of M position vectors."""
    flat = x_b.reshape(x_b.shape[0], -1)
    return [flat[:, m] for m in range(flat.shape[1])]


def plain_cov(x_b, centred=True):
    cols = columns(x_b)
    mu = sum(cols) / len(cols) if centred else torch.zeros_like(cols[0])
    return sum(torch.outer(c - mu, c - mu) for c in cols) / len(cols)


def plain_ns(a, n, normaliser):
    d = a.shape[0]
    eye = torch.eye(d, dtype=a.dtype)
    s = normaliser(a)
    y, z = a / s, eye
    for _ in range(n):
        t = 0.5 * (3 * eye - z @ y)
        y, z = y @ t, t @ z
    return y * s.sqrt()


def trace(a):
    return torch.trace(a)


def eig_fn(a, f):
    lam, u = torch.linalg.eigh(a)
    return u @ torch.diag(f(lam)) @ u.T


def triu(a):
    d = a.shape[0]
    return torch.stack([a[i, j] for i in range(d) for j in range(i, d)])


def ssqrt(v, eps):
    return torch.sign(v) * torch.sqrt(v.abs() + eps)


def l2(v):
    return v / v.norm()


def per_image(fn):
    return lambda x: torch.stack([fn(x[b]) for b in range(x.shape[0])])


def conv1x1(x_b, weight, bias=None):
    out = torch.einsum("oc,chw->ohw", weight[:, :, 0, 0], x_b)
    return out if bias is None else out + bias[:, None, None]


def circular_conv(a, b):
    d = a.shape[0]
    return torch.stack([sum(a[i] * b[(j - i) % d] for i in range(d)) for j in range(d)])


def count_sketch(v, h, s, d):
    out = torch.zeros(d, dtype=v.dtype)
    for c in range(v.shape[0]):
        out = out + F.one_hot(h[c], d).to(v.dtype) * s[c] * v[c]
    return out


# ---- the heads ----------------------------------------------------------------------------------
def test_bcnn():
    x = torch.randn(2, 5, 3, 3, dtype=torch.float64)
    check(build_head("bcnn", 5), per_image(lambda xb: l2(ssqrt(plain_cov(xb, False).flatten(), 1e-5))), x)


def test_isqrt():
    x = torch.randn(2, 6, 3, 4, dtype=torch.float64)
    check(build_head("isqrt", 6, reduction=None), per_image(lambda xb: triu(plain_ns(plain_cov(xb), 5, trace))), x)


def test_srsop():
    x = torch.randn(2, 6, 3, 4, dtype=torch.float64)
    head = build_head("srsop", 6, mid_channels=5, out_channels=4).double()
    c1, c2 = head.reduce[0][0], head.reduce[1][0]

    def ref(xb):
        y = torch.relu(conv1x1(torch.relu(conv1x1(xb, c1.weight, c1.bias)), c2.weight, c2.bias))
        return triu(plain_ns(plain_cov(y), 3, trace))

    check(head, per_image(ref), x)


class _BlockSignSqrt(torch.autograd.Function):
    """Reference for improved B-CNN (the authors' matrix-sqrt code): Z = NS(A/‖A‖_F)·√‖A‖_F forward;
    backward = Newton–Schulz sign iteration of the block matrix [[Z, G], [0, −Z]]/‖Z‖_F, whose sign is
    [[I, 2X], [0, −I]] with Z X + X Z = G, and X is the gradient of A."""

    @staticmethod
    def forward(ctx, a, n, nb):
        norm = a.norm()
        z = plain_ns(a / norm, n, lambda m: torch.ones((), dtype=m.dtype)) * norm.sqrt()
        ctx.save_for_backward(z)
        ctx.nb = nb
        return z

    @staticmethod
    def backward(ctx, g):
        (z,) = ctx.saved_tensors
        d = z.shape[0]
        block = torch.zeros(2 * d, 2 * d, dtype=z.dtype)
        block[:d, :d], block[:d, d:], block[d:, d:] = z, g, -z
        y = block / z.norm()
        for _ in range(ctx.nb):
            y = 0.5 * y @ (3 * torch.eye(2 * d, dtype=z.dtype) - y @ y)
        return 0.5 * y[:d, d:], None, None


@pytest.mark.parametrize("iterations", [5, 30])
def test_improved_bcnn(iterations):
    x = torch.randn(2, 4, 4, 4, dtype=torch.float64)

    def ref(xb):
        z = _BlockSignSqrt.apply(plain_cov(xb, centred=False), iterations, iterations)
        return l2(ssqrt(z.flatten(), 1e-5))

    check(build_head("improved_bcnn", 4, iterations=iterations, backward_iterations=iterations), per_image(ref), x)


def test_improved_bcnn_backward_converges_to_exact_lyapunov_gradient():
    """With enough iterations the Lyapunov backward equals autograd through the exact eigen square root."""
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64)

    def exact(xb):
        a = plain_cov(xb, centred=False)
        return l2(ssqrt(eig_fn(a, torch.sqrt).flatten(), 1e-5))

    check(build_head("improved_bcnn", 4, iterations=40, backward_iterations=40), per_image(exact), x, tol=1e-6)


def test_mpncov():
    x = torch.randn(2, 5, 4, 4, dtype=torch.float64)
    check(build_head("mpncov", 5, reduction=None), per_image(lambda xb: triu(eig_fn(plain_cov(xb), torch.sqrt))), x)


def test_mpncov_power_and_eps():
    x = torch.randn(2, 5, 4, 4, dtype=torch.float64)
    head = build_head("mpncov", 5, reduction=None, alpha=0.3, eps=1e-2)
    check(head, per_image(lambda xb: triu(eig_fn(plain_cov(xb), lambda l: (l + 1e-2) ** 0.3))), x)


def test_o2p():
    x = torch.randn(2, 5, 4, 4, dtype=torch.float64)
    check(build_head("o2p", 5), per_image(lambda xb: triu(eig_fn(plain_cov(xb), lambda l: torch.log(l + 1e-3)))), x)


def g2de_reference(xb, root, triu_out=False):
    kept = xb.abs() > 1e-6
    xs = torch.where(kept, torch.sign(xb) * xb.abs().clamp_min(1e-300).sqrt(), torch.zeros_like(xb))
    cols = columns(xs)
    mu = sum(cols) / len(cols)
    sigma = sum(torch.outer(c - mu, c - mu) for c in cols) / len(cols)
    d = xb.shape[0]
    y = torch.zeros(d + 1, d + 1, dtype=xb.dtype)
    y = torch.cat([torch.cat([sigma + torch.outer(mu, mu), mu[:, None]], 1),
                   torch.cat([mu[None, :], torch.ones(1, 1, dtype=xb.dtype)], 1)], 0)
    z = root(y)
    return l2(ssqrt(triu(z) if triu_out else z.flatten(), 1e-8))


@pytest.mark.parametrize("triu_out", [False, True])
def test_g2de_eig(triu_out):
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64).abs() + 0.01  # post-ReLU-like, away from the threshold
    check(build_head("g2de", 4, triu=triu_out),
          per_image(lambda xb: g2de_reference(xb, lambda y: eig_fn(y, lambda l: (l + 1e-3).sqrt()), triu_out)), x)


def test_g2de_newton_schulz():
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64).abs() + 0.01
    eye = torch.eye(5, dtype=torch.float64)
    check(build_head("g2de", 4, method="ns"),
          per_image(lambda xb: g2de_reference(xb, lambda y: plain_ns(y + 1e-3 * eye, 5, trace))), x)


def test_cbp_tensor_sketch():
    # More channels than bins: every bin of the sketch is hit, so no entry sits at the signed
    # square root's jump at 0 (where FFT round-off and exact arithmetic would differ by 2√ε).
    c, d = 16, 8
    head = build_head("cbp", c, output_dim=d, variant="ts", seed=3)
    h, s = head.sketches.hashes, head.sketches.signs.double()
    x = torch.randn(2, c, 2, 3, dtype=torch.float64)

    def ref(xb):
        cols = columns(xb)
        ts = sum(circular_conv(count_sketch(v, h[0], s[0], d), count_sketch(v, h[1], s[1], d)) for v in cols)
        return l2(ssqrt(ts / len(cols), 1e-5))

    check(head, per_image(ref), x)


def test_cbp_random_maclaurin():
    c, d = 5, 12
    head = build_head("cbp", c, output_dim=d, variant="rm", seed=1)
    w1, w2 = head.w1.double(), head.w2.double()
    x = torch.randn(2, c, 3, 3, dtype=torch.float64)

    def ref(xb):
        cols = columns(xb)
        return l2(ssqrt(sum((v @ w1) * (v @ w2) for v in cols) / len(cols) / math.sqrt(d), 1e-5))

    check(head, per_image(ref), x)


def test_kp():
    c, d = 12, 8
    head = build_head("kp", c, order=4, sketch_dim=d, gamma=0.7)
    h, s = head.sketches.hashes, head.sketches.signs.double()
    alpha = head.alpha.detach().double()
    expected_alpha = [math.sqrt(math.exp(-1.4) * 1.4 ** i / math.factorial(i)) for i in range(5)]
    assert torch.allclose(alpha, torch.tensor(expected_alpha, dtype=torch.float64), rtol=1e-6)
    x = torch.randn(2, c, 2, 2, dtype=torch.float64)

    def ref(xb):
        cols = columns(xb)
        terms = [alpha[0:1], alpha[1] * sum(cols) / len(cols)]
        for order in range(2, 5):
            total = 0
            for v in cols:
                t = count_sketch(v, h[0], s[0], d)
                for k in range(1, order):
                    t = circular_conv(t, count_sketch(v, h[k], s[k], d))
                total = total + t
            terms.append(alpha[order] * total / len(cols))
        return l2(ssqrt(torch.cat(terms), 1e-5))

    check(head, per_image(ref), x)
    assert head.output_dim == 1 + c + 3 * d


def test_netvlad():
    c, k = 4, 3
    head = build_head("netvlad", c, clusters=k, alpha=2.0).double()
    cent, w, bias = head.centroids, head.assign.weight[:, :, 0, 0], head.assign.bias
    torch.testing.assert_close(w, 2 * 2.0 * cent)
    x = torch.randn(2, c, 3, 2, dtype=torch.float64)

    def ref(xb):
        cols = [v / v.norm() for v in columns(xb)]
        parts = []
        for j in range(k):
            acc = torch.zeros(c, dtype=xb.dtype)
            for v in cols:
                a = torch.softmax(w @ v + bias, 0)
                acc = acc + a[j] * (v - cent[j])
            parts.append(l2(acc))
        return l2(torch.cat(parts))

    check(head, per_image(ref), x)


def test_netfv():
    c, k = 4, 3
    head = build_head("netfv", c, clusters=k).double()
    with torch.no_grad():
        head.scales.uniform_(0.5, 1.5)
    w, bias = head.assign.weight[:, :, 0, 0], head.assign.bias
    mu, sig = head.means, head.scales ** 2 + 1e-6
    x = torch.randn(2, c, 3, 2, dtype=torch.float64)

    def ref(xb):
        cols = columns(xb)
        first, second = [], []
        for j in range(k):
            f1 = sum(torch.softmax(w @ v + bias, 0)[j] * (v - mu[j]) / sig[j] for v in cols) / len(cols)
            f2 = sum(torch.softmax(w @ v + bias, 0)[j] * (v - mu[j]) ** 2 / sig[j] ** 2 for v in cols) / len(cols)
            first.append(f1)
            second.append(f2)
        return l2(torch.cat([l2(torch.cat(first)), l2(torch.cat(second))]))

    check(head, per_image(ref), x)


@pytest.mark.parametrize("positions", ["sum", "mean"])
def test_lrbp(positions):
    c, m, classes, rank = 5, 4, 3, 4
    head = build_head("lrbp", c, num_classes=classes, reduction=m, rank=rank, positions=positions,
                      freeze_reduction=False).double()
    with torch.no_grad():
        head.bias.normal_()
    p = head.project.weight[:, :, 0, 0].view(classes, rank, m)
    x = torch.randn(2, c, 3, 3, dtype=torch.float64)

    def ref(xb):
        y = conv1x1(xb, head.reduce.weight, head.reduce.bias).reshape(m, -1)
        scores = []
        for k in range(classes):
            u, v = p[k, : rank // 2].T, p[k, rank // 2:].T
            w_k = u @ u.T - v @ v.T
            scores.append(torch.trace(w_k @ y @ y.T) / (y.shape[1] if positions == "mean" else 1) + head.bias[k])
        return torch.stack(scores)

    check(head, per_image(ref), x)
    assert head.produces_logits and head.output_dim == classes


def test_hihca():
    c = 5
    head = build_head("hihca", c, filters=7, degree=2).double()
    u1, u2 = (conv.weight[:, :, 0, 0] for conv in head.projections)
    x = torch.randn(2, c, 3, 3, dtype=torch.float64)

    def ref(xb):
        cols = columns(xb)
        return l2(ssqrt(sum((u1 @ v) * (u2 @ v) for v in cols) / len(cols), 1e-5))

    check(head, per_image(ref), x)


def test_gmsop_eval():
    c = 5
    head = build_head("gmsop", c, components=4, top_k=2, mid_channels=4, out_channels=3).double().eval()
    with torch.no_grad():
        head.gate.weight.normal_()
    x = torch.randn(2, c, 3, 3, dtype=torch.float64)

    def srsop(block, xb):
        (c1, *bn1), (c2, *bn2) = block.reduce[0], block.reduce[1]
        y = xb
        for conv, rest in ((c1, bn1), (c2, bn2)):
            y = conv1x1(y, conv.weight, conv.bias)
            if len(rest) == 2:  # eval-mode BN: (y − running mean)/√(var + eps)·γ + β
                bn = rest[0]
                y = ((y - bn.running_mean[:, None, None]) / torch.sqrt(bn.running_var[:, None, None] + bn.eps)
                     * bn.weight[:, None, None] + bn.bias[:, None, None])
            y = torch.relu(y)
        return triu(plain_ns(plain_cov(y), 3, trace))

    def ref(xb):
        logits = head.gate.weight @ srsop(head.gate_features, xb)
        top = torch.topk(logits, 2).indices
        weights = torch.softmax(logits[top], 0)
        return sum(wt * srsop(head.experts[int(i)], xb) for wt, i in zip(weights, top))

    check(head, per_image(ref), x)


def test_gmsop_keeps_exactly_k_components_per_image():
    head = build_head("gmsop", 8, components=6, top_k=3, mid_channels=8, out_channels=4)
    x = torch.randn(5, 8, 4, 4)
    for mode in ("train", "eval"):
        getattr(head, mode)()
        head(x)
        gates = head.last_gates
        assert ((gates > 0).sum(dim=1) == 3).all(), mode
        torch.testing.assert_close(gates.sum(dim=1), torch.ones(5))
    logits = torch.randn(4, 6)
    gates = top_k_gates(logits, 3)
    assert ((gates > 0).sum(1) == 3).all()
    assert torch.equal(gates > 0, torch.zeros_like(gates, dtype=torch.bool).scatter(1, logits.topk(3).indices, True))


def test_gmsop_aux_loss():
    from finegrained.heads.gmsop import load_balance_loss

    balanced = torch.tensor([[0.5, 0.5, 0.0, 0.0], [0.0, 0.0, 0.5, 0.5]])
    assert load_balance_loss(balanced).item() == 0.0
    skewed = torch.tensor([[1.0, 0.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0]])
    importance = torch.tensor([2.0, 0.0, 0.0, 0.0])
    expected = 100 * importance.var(correction=1) / importance.mean() ** 2  # MATLAB's std (N − 1)
    torch.testing.assert_close(load_balance_loss(skewed), expected)
    head = build_head("gmsop", 8, components=4, top_k=2, mid_channels=8, out_channels=4).train()
    head(torch.randn(3, 8, 4, 4))
    assert head.aux_loss is not None and head.aux_loss.requires_grad and torch.isfinite(head.aux_loss)
    head.eval()
    head(torch.randn(3, 8, 4, 4))
    assert head.aux_loss is None
