"""Heads: shapes, exact formulas against plain float64 references, degenerate inputs, autocast."""
import pytest
import torch
import torch.nn.functional as F
from torch.autograd import gradcheck

from finegrained.heads import available_heads, build_head
from finegrained.linalg import covariance, sqrtm_newton_schulz, triu_vec

torch.manual_seed(0)


def test_registry_lists_heads_and_rejects_unknown():
    assert {"gap", "bcnn", "isqrt"} <= set(available_heads())
    with pytest.raises(ValueError) as err:
        build_head("nope", 8)
    for name in ("gap", "bcnn", "isqrt"):
        assert name in str(err.value)


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


def test_isqrt_without_reduction_is_exact_composition():
    x = torch.randn(2, 16, 5, 5, dtype=torch.float64)
    head = build_head("isqrt", 16, reduction=None)
    expected = triu_vec(sqrtm_newton_schulz(covariance(x)))
    assert torch.equal(head(x), expected)


def test_isqrt_reduction_layer_layout():
    head = build_head("isqrt", 64, reduction=32)
    conv, bn, relu = head.reduce
    assert isinstance(conv, torch.nn.Conv2d) and conv.bias is None and conv.kernel_size == (1, 1)
    assert isinstance(bn, torch.nn.BatchNorm2d) and isinstance(relu, torch.nn.ReLU)
    assert conv.out_channels == 32


@pytest.mark.parametrize("name,kwargs", [("gap", {}), ("bcnn", {}), ("isqrt", {"reduction": None}), ("isqrt", {"reduction": 8})])
def test_gradcheck_heads_float64(name, kwargs):
    head = build_head(name, 6, **kwargs).double().eval()
    x = torch.randn(2, 6, 3, 3, dtype=torch.float64, requires_grad=True)
    assert gradcheck(head, (x,))


DEGENERATE = {
    "zeros": lambda: torch.zeros(2, 8, 4, 4),
    "constant": lambda: torch.full((2, 8, 4, 4), 3.0),
    "rank1": lambda: torch.randn(2, 8, 1, 1) * torch.randn(2, 1, 4, 4),
    "fewer_positions_than_channels": lambda: torch.randn(2, 8, 1, 3),
    "tiny": lambda: torch.randn(2, 8, 4, 4) * 1e-8,
    "huge": lambda: torch.randn(2, 8, 4, 4) * 1e8,
}


@pytest.mark.parametrize("case", sorted(DEGENERATE))
@pytest.mark.parametrize("name,kwargs", [("gap", {}), ("bcnn", {}), ("isqrt", {"reduction": None}), ("isqrt", {"reduction": 4})])
def test_degenerate_features_finite(case, name, kwargs):
    head = build_head(name, 8, **kwargs)
    x = DEGENERATE[case]().requires_grad_(True)
    out = head(x)
    assert torch.isfinite(out).all(), f"{name} output not finite on {case}"
    out.sum().backward()
    assert torch.isfinite(x.grad).all(), f"{name} gradient not finite on {case}"


@pytest.mark.parametrize("name", ["bcnn", "isqrt"])
def test_bf16_autocast_keeps_matrix_part_in_float32(name):
    head = build_head(name, 16, **({"reduction": 8} if name == "isqrt" else {}))
    x = torch.randn(2, 16, 5, 5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = head(x)
    assert out.dtype == torch.float32
    assert torch.isfinite(out).all()
    reference = head(x)
    torch.testing.assert_close(out, reference, rtol=0.05, atol=0.05)
