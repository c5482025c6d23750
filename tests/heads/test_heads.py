"""Heads: shapes, exact formulas against plain float64 references, degenerate inputs, autocast."""
import re

import pytest
import scipy.linalg
import torch
from torch.autograd import gradcheck

from finegrained.heads import available_heads, build_head
from finegrained.ops import covariance
from tests.conftest import SMALL_HEAD_KWARGS

torch.manual_seed(0)


ALL_HEADS = ["bcnn", "cbp", "dropcov", "g2de", "gap", "gmsop", "hihca", "improved_bcnn", "isice", "isqrt", "kp",
             "lrbp", "mpa", "mpncov", "netfv", "netvlad", "o2p", "sot", "srsop"]

SMALL = SMALL_HEAD_KWARGS


def test_registry_lists_heads_and_rejects_unknown():
    assert available_heads() == sorted(ALL_HEADS)
    with pytest.raises(ValueError) as err:
        build_head("nope", 8)
    for name in ALL_HEADS:
        assert name in str(err.value)


def test_logit_heads_need_num_classes():
    with pytest.raises(ValueError, match="num_classes"):
        build_head("lrbp", 8)
    assert build_head("gap", 8, num_classes=5).output_dim == 8  # ignored by pooling heads


@pytest.mark.parametrize("channels", [64, 512])
@pytest.mark.parametrize("name", ALL_HEADS)
def test_every_head_builds_with_defaults(name, channels):
    """The acceptance: (2, C, 14, 14) -> (2, output_dim), finite values and gradients, paper defaults."""
    head = build_head(name, channels, num_classes=10)
    x = torch.randn(2, channels, 14, 14).relu_().requires_grad_(True)
    out = head(x)
    assert out.shape == (2, head.output_dim)
    assert torch.isfinite(out).all()
    (out * torch.randn_like(out)).sum().backward()
    assert torch.isfinite(x.grad).all()
    assert all(torch.isfinite(p.grad).all() for p in head.parameters() if p.grad is not None)


@pytest.mark.parametrize("name,channels,expected_dim", [
    ("bcnn", 512, 262144), ("improved_bcnn", 512, 262144), ("isqrt", 2048, 32896), ("mpncov", 2048, 32896),
    ("cbp", 512, 8192), ("kp", 512, 12801), ("kp", 2048, 14337), ("netvlad", 512, 32768),
    ("g2de", 512, 263169), ("hihca", 512, 8192), ("srsop", 2048, 8256), ("gmsop", 512, 8256),
    ("o2p", 512, 131328), ("netfv", 512, 65536),
    ("sot", 384, 3456), ("dropcov", 2048, 32896), ("isice", 2048, 32896), ("mpa", 2048, 32896),
])
def test_output_sizes_of_the_seed_tables(name, channels, expected_dim):
    assert build_head(name, channels).output_dim == expected_dim


@pytest.mark.parametrize("name,kwargs,channels,expected_dim", [
    ("gap", {}, 64, 64),
    ("bcnn", {}, 32, 32 * 32),
    ("isqrt", {}, 64, 32896),
    ("isqrt", {"reduction": 128}, 64, 8256),
    ("isqrt", {"reduction": None}, 20, 210),
])
def test_output_shapes(name, kwargs, channels, expected_dim):
    head = build_head(name, channels, **kwargs)
    assert head.output_dim == expected_dim
    out = head(torch.randn(3, channels, 5, 6))
    assert out.shape == (3, expected_dim)


def test_gap_is_mean_over_positions():
    x = torch.randn(2, 7, 3, 4, dtype=torch.float64)
    torch.testing.assert_close(build_head("gap", 7)(x), x.flatten(2).mean(-1))


def test_bcnn_plain_formula():
    x = torch.randn(2, 6, 4, 3, dtype=torch.float64)
    eps = 1e-5
    flat = x.flatten(2)
    g = torch.stack([flat[b] @ flat[b].T / flat.shape[-1] for b in range(2)]).reshape(2, -1)
    z = torch.sign(g) * torch.sqrt(g.abs() + eps)
    ref = z / z.norm(dim=1, keepdim=True)
    torch.testing.assert_close(build_head("bcnn", 6, eps=eps)(x), ref)


def _isqrt_written_plainly(x, n=5):
    """iSQRT-COV from its formulas: mean-centred covariance, N full coupled Newton–Schulz steps on Σ/tr Σ,
    × √tr Σ, upper triangle row by row."""
    b, c = x.shape[:2]
    flat = x.reshape(b, c, -1)
    centred = flat - flat.mean(dim=2, keepdim=True)
    sigma = centred @ centred.transpose(1, 2) / flat.shape[2]
    trace = torch.einsum("bii->b", sigma).view(b, 1, 1)
    eye = torch.eye(c, dtype=x.dtype)
    y, z = sigma / trace, eye
    for _ in range(n):
        t = 0.5 * (3 * eye - z @ y)
        y, z = y @ t, t @ z
    root = y * trace.sqrt()
    return torch.stack([torch.cat([root[i, r, r:] for r in range(c)]) for i in range(b)])


@pytest.mark.parametrize("requires_grad", [False, True])
def test_isqrt_without_reduction_matches_the_formulas(requires_grad):
    """Evaluation (no grad: plain Newton–Schulz) and training (the fused Function with this device's
    backward) paths both equal the formulas; in training the gradient does too."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 16, 5, 5, generator=g, dtype=torch.float64).relu_().requires_grad_(requires_grad)
    head = build_head("isqrt", 16, reduction=None).train(requires_grad)
    out, expected = head(x), _isqrt_written_plainly(x)
    assert out.shape == (2, 16 * 17 // 2)
    assert (out - expected).abs().max() <= 1e-12 * expected.abs().max()
    if requires_grad:
        weights = torch.randn(out.shape, generator=g, dtype=torch.float64)
        (grad,) = torch.autograd.grad((out * weights).sum(), x)
        (ref,) = torch.autograd.grad((expected * weights).sum(), x)
        assert (grad - ref).abs().max() <= 1e-9 * ref.abs().max()


def test_isqrt_reduction_layer_layout():
    head = build_head("isqrt", 64, reduction=32)
    conv, bn, relu = head.reduce
    assert isinstance(conv, torch.nn.Conv2d) and conv.bias is None and conv.kernel_size == (1, 1)
    assert isinstance(bn, torch.nn.BatchNorm2d) and isinstance(relu, torch.nn.ReLU)
    assert conv.out_channels == 32


@pytest.mark.parametrize("name", ALL_HEADS)
def test_gradcheck_heads_float64(name):
    # Sketches narrower than the channel count hit every bin: no output entry sits at the signed
    # square root's jump at exactly 0, where finite differences are meaningless.
    kwargs = {**SMALL[name], **{"cbp": {"output_dim": 4}, "kp": {"sketch_dim": 4}}.get(name, {})}
    head = build_head(name, 6, **kwargs).double().eval()
    x = (torch.rand(2, 6, 3, 3, dtype=torch.float64) + 0.1).requires_grad_(True)
    if name == "improved_bcnn":  # the Lyapunov backward is exact once both iterations converge
        head = build_head(name, 6, iterations=40, backward_iterations=40).double()
    if name == "mpa":
        # The Lyapunov backward is the exact square root's derivative; the [5/5] Padé forward matches the exact
        # root closely only where Σ/‖Σ‖_F has no tiny eigenvalues: 64 positions of 6 uniform channels.
        x = torch.rand(1, 6, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64).requires_grad_(True)
    assert gradcheck(head, (x,))


DEGENERATE = {
    "zeros": lambda: torch.zeros(2, 8, 4, 4),
    "constant": lambda: torch.full((2, 8, 4, 4), 3.0),
    "rank1": lambda: torch.randn(2, 8, 1, 1) * torch.randn(2, 1, 4, 4),
    "fewer_positions_than_channels": lambda: torch.randn(2, 8, 1, 3),
    "tiny": lambda: torch.randn(2, 8, 4, 4) * 1e-8,
    "huge": lambda: torch.randn(2, 8, 4, 4) * 1e8,
    # Rows of a Hadamard matrix: centred, orthogonal, equal norms -> Σ = I, one eigenvalue repeated 8 times.
    "repeated_eigenvalues": lambda: torch.tensor(scipy.linalg.hadamard(16)[1:9], dtype=torch.float32)
    .view(1, 8, 4, 4).repeat(2, 1, 1, 1),
}


def test_repeated_eigenvalue_case_is_what_it_claims():
    sigma = covariance(DEGENERATE["repeated_eigenvalues"]())
    torch.testing.assert_close(sigma, torch.eye(8).expand(2, 8, 8))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("case", sorted(DEGENERATE))
@pytest.mark.parametrize("name", ALL_HEADS)
def test_degenerate_features_finite(case, name, dtype):
    head = build_head(name, 8, **SMALL[name]).to(dtype)
    x = DEGENERATE[case]().to(dtype).requires_grad_(True)
    out = head(x)
    assert torch.isfinite(out).all(), f"{name} output not finite on {case}"
    (out * torch.randn_like(out)).sum().backward()
    assert torch.isfinite(x.grad).all(), f"{name} gradient not finite on {case}"
    for p in head.parameters():
        assert p.grad is None or torch.isfinite(p.grad).all(), f"{name} parameter gradient not finite on {case}"


def _layers_that_ran_in_bf16(module, x):
    """Convolutions and linear layers whose output is bf16 in an autocast forward (a head may switch autocast
    off around them too)."""
    ran, handles = [], []
    for layer in module.modules():
        if isinstance(layer, (torch.nn.Conv2d, torch.nn.Linear)):
            handles.append(layer.register_forward_hook(
                lambda layer, args, out: ran.append(layer) if out.dtype == torch.bfloat16 else None))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = module(x)
    for handle in handles:
        handle.remove()
    return out, ran


def _float32_with_bf16_layers(module, x, layers):
    """A float32 forward in which ``layers`` round as bf16 autocast does (inputs, weights, outputs)."""
    def round_inputs(layer, args):
        layer._float32_weight = layer.weight.data
        layer.weight.data = layer.weight.data.bfloat16().float()
        return tuple(a.bfloat16().float() if torch.is_tensor(a) else a for a in args)

    def round_output(layer, args, out):
        layer.weight.data = layer._float32_weight
        return out.bfloat16().float()

    handles = [h for layer in layers for h in (layer.register_forward_pre_hook(round_inputs),
                                               layer.register_forward_hook(round_output))]
    out = module(x)
    for handle in handles:
        handle.remove()
    return out


@pytest.mark.parametrize("name", ALL_HEADS)
def test_bf16_autocast_keeps_matrix_part_in_float32(name):
    """Under bf16 autocast only convolutions and linear layers may round to bf16: the output matches a
    float32 run with just those layers rounded, far inside bf16's own error (which a matrix function run in
    bf16 would show)."""
    torch.manual_seed(0)
    head = build_head(name, 16, **SMALL[name]).eval()
    x = torch.randn(2, 16, 5, 5).relu()
    out, bf16_layers = _layers_that_ran_in_bf16(head, x)
    assert out.dtype == torch.float32
    assert torch.isfinite(out).all()
    reference = _float32_with_bf16_layers(head, x, bf16_layers)
    torch.testing.assert_close(out, reference, rtol=1e-3, atol=1e-4)


def test_every_head_names_the_paper_to_cite():
    from finegrained.heads import head_paper
    for name in available_heads():
        paper = head_paper(name)
        assert re.search(r"(19|20)\d\d", paper) and '"' in paper, (name, paper)  # authors, "title", venue year
