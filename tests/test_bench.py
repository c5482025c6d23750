"""`finegrained bench`: correctness of every optimised path (no timings asserted: machines are noisy)."""
import os

import pandas as pd
import pytest
import torch
from torch.autograd import gradcheck

from finegrained.bench import baselines, timing
from finegrained.bench.heads import _check
from finegrained.cli import main
from finegrained.ops import (covariance, count_sketch, count_sketch_matrix, isqrt_cov, sqrtm_newton_schulz,
                             tensor_sketch, tensor_sketch_gram, tensor_sketch_hashed)


def test_bench_heads_quick_checks_parity(capsys):
    assert main(["bench", "heads", "--quick", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "parity: every optimised path matches its baseline" in out
    assert "isqrt vs (b) official" in out and "cbp Gram scatter vs dense" in out


def test_parity_check_fails_on_a_wrong_path():
    x = torch.randn(2, 4, 3, 3)
    with pytest.raises(RuntimeError, match="differs from its baseline"):
        _check("wrong", lambda t: isqrt_cov(t, 5) * 1.001, lambda t: baselines.isqrt_autograd(t, 5), x, 1e-5)


@pytest.mark.parametrize("n", [1, 2, 3, 5])
def test_fused_isqrt_gradcheck_and_equality(n):
    x = torch.randn(2, 5, 12, dtype=torch.float64, requires_grad=True)
    assert gradcheck(lambda t: isqrt_cov(t, n), (x,))
    torch.testing.assert_close(isqrt_cov(x, n), sqrtm_newton_schulz(covariance(x), n), rtol=1e-12, atol=1e-12)


def test_official_isqrt_baseline_is_the_same_function():
    x = torch.randn(2, 5, 12, dtype=torch.float64, requires_grad=True)
    assert gradcheck(lambda t: baselines.isqrt_official(t, 3), (x,))
    torch.testing.assert_close(baselines.isqrt_official(x, 5), baselines.isqrt_autograd(x, 5), rtol=1e-12, atol=1e-12)


def test_fused_isqrt_saves_less_memory_than_autograd():
    x = torch.randn(4, 32, 10, 10).relu_().requires_grad_(True)
    fused = timing.saved_bytes(lambda t: isqrt_cov(t, 5), x)
    plain = timing.saved_bytes(lambda t: baselines.isqrt_autograd(t, 5), x)
    assert 0 < fused < 0.6 * plain


@pytest.mark.parametrize("channels, positions", [(32, 12), (24, 100)])
def test_fused_isqrt_float32_is_close_to_float64(channels, positions):
    """Rank-deficient (M < C) and full-rank ReLU features: float32 within 1e-5 of a float64 reference."""
    g = torch.Generator().manual_seed(0)
    x64 = torch.randn(4, channels, positions, generator=g, dtype=torch.float64).relu_() * 3
    upstream = torch.randn(4, channels, channels, generator=g, dtype=torch.float64)

    def value_and_grad(fn, dtype):
        x = x64.to(dtype).requires_grad_(True)
        out = fn(x)
        (grad,) = torch.autograd.grad((out * upstream.to(dtype)).sum(), x)
        return out.double(), grad.double()

    ref_out, ref_grad = value_and_grad(lambda t: baselines.isqrt_autograd(t, 5), torch.float64)
    out, grad = value_and_grad(lambda t: isqrt_cov(t, 5), torch.float32)
    assert (out - ref_out).abs().max() <= 1e-5 * ref_out.abs().max()
    assert (grad - ref_grad).abs().max() <= 1e-5 * ref_grad.abs().max()


@pytest.mark.parametrize("n", [1, 2, 5])
def test_fused_isqrt_saves_exactly_its_documented_tensors(n):
    """X, A, P_1 … P_{N−1}, Y_{N−1} (N + 1 C×C matrices; A alone when N = 1) and the traces."""
    b, c, m = 3, 8, 20
    x = torch.randn(b, c, m).requires_grad_(True)
    matrices = n + 1 if n >= 2 else 1
    expected = 4 * (b * c * m + matrices * b * c * c + b)
    assert timing.saved_bytes(lambda t: isqrt_cov(t, n), x) == expected


def test_sketch_implementations_agree():
    g = torch.Generator().manual_seed(0)
    c, d = 7, 16
    x = torch.randn(3, c, 4, 5, dtype=torch.float64)
    hashes = torch.randint(d, (2, c), generator=g)
    signs = (torch.randint(2, (2, c), generator=g) * 2 - 1).double()
    dense = [torch.nn.functional.one_hot(hashes[k], d).double() * signs[k, :, None] for k in range(2)]
    reference = tensor_sketch(x, dense)[0]
    torch.testing.assert_close(tensor_sketch_hashed(x, hashes, signs, d)[0], reference)
    torch.testing.assert_close(tensor_sketch_gram(x, hashes, signs, d), reference)
    rows = torch.randn(6, c, dtype=torch.float64)
    torch.testing.assert_close(count_sketch(rows, hashes[0], signs[0], d), rows @ dense[0])
    assert count_sketch_matrix(c, d, g).abs().sum(1).eq(1).all()
    xg = x.clone().requires_grad_(True)
    assert gradcheck(lambda t: tensor_sketch_gram(t, hashes, signs, d), (xg,))


def test_bench_loader_and_step_run_and_write_csv(tmp_path, capsys):
    out = str(tmp_path / "bench")
    assert main(["bench", "loader", "--images", "2", "--repeats", "1", "--folder", str(tmp_path / "jpegs"),
                 "--device", "cpu", "--out", out]) == 0
    loader = pd.read_csv(os.path.join(out, "loader_cpu.csv"))
    assert list(loader["speedup"])[0] == 1.0 and loader["images_per_s_per_core"].gt(0).all()
    assert {"platform", "torch", "timestamp"} <= set(loader.columns)
    assert main(["bench", "step", "--backbone", "resnet18", "--size", "64", "--batch", "2", "--repeats", "1",
                 "--device", "cpu", "--out", out]) == 0
    step = pd.read_csv(os.path.join(out, "step_cpu.csv"))
    assert list(step["head"]) == ["gap", "isqrt"] and step["overhead_vs_gap"].notna().all()
