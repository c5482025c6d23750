"""`finegrained bench`: correctness of every optimised path (no timings asserted: machines are noisy)."""
import os

import pandas as pd
import pytest
import torch
from torch.autograd import gradcheck

import finegrained
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


ROUTES = ["newton_schulz", "eigh"]


@pytest.mark.parametrize("n", [1, 2, 3, 5])
@pytest.mark.parametrize("route", ROUTES)
def test_fused_isqrt_gradcheck_and_equality(n, route):
    x = torch.randn(2, 5, 12, dtype=torch.float64, requires_grad=True)
    assert gradcheck(lambda t: isqrt_cov(t, n, backward=route), (x,))
    torch.testing.assert_close(isqrt_cov(x, n, backward=route), sqrtm_newton_schulz(covariance(x), n),
                               rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("route", ROUTES)
def test_fused_isqrt_gradient_matches_the_plain_formulas_in_float64(route):
    """Both backwards give the gradient of the formulas within 1e-9, on full-rank and rank-deficient maps."""
    g = torch.Generator().manual_seed(1)
    for channels, positions in ((6, 30), (12, 5)):
        x = torch.randn(3, channels, positions, generator=g, dtype=torch.float64).relu_().requires_grad_(True)
        upstream = torch.randn(3, channels, channels, generator=g, dtype=torch.float64)
        (grad,) = torch.autograd.grad((isqrt_cov(x, 5, backward=route) * upstream).sum(), x)
        (ref,) = torch.autograd.grad((_plain_isqrt(x, 5) * upstream).sum(), x)
        assert (grad - ref).abs().max() <= 1e-9 * ref.abs().max()


def test_the_spectral_forward_is_the_newton_schulz_forward():
    """On the CPU route one eigh gives the forward too: U NS_N(Λ) Uᵀ equals the matrix iteration (float64, ≤ 1e-6
    relative) on full-rank, rank-deficient and constant maps."""
    g = torch.Generator().manual_seed(3)
    for x in (torch.randn(2, 16, 40, generator=g, dtype=torch.float64).relu_(),
              torch.randn(2, 16, 5, generator=g, dtype=torch.float64).relu_(),
              torch.ones(1, 6, 9, dtype=torch.float64)):
        xx = x.clone().requires_grad_(True)
        spectral = isqrt_cov(xx, 5, backward="eigh")
        matrix = isqrt_cov(x.clone().requires_grad_(True), 5, backward="newton_schulz")
        assert (spectral - matrix).abs().max() <= 1e-6 * matrix.abs().max().clamp_min(1e-300)
        assert torch.isfinite(torch.autograd.grad(spectral.sum(), xx)[0]).all()


def test_the_backward_is_chosen_per_device_in_one_place():
    from finegrained.ops.isqrt import isqrt_backward_route
    assert isqrt_backward_route(torch.device("cpu")) == "eigh"
    assert isqrt_backward_route(torch.device("cuda")) == "newton_schulz"
    with pytest.raises(ValueError, match="backward must be"):
        isqrt_cov(torch.randn(1, 3, 4, requires_grad=True), 5, backward="svd")


def test_divided_differences_of_the_scalar_iteration():
    """D_ij = (f(λ_i) − f(λ_j)) / (λ_i − λ_j) for distinct, f'(λ) for equal eigenvalues; f = NS_N."""
    from finegrained.ops.isqrt import newton_schulz_divided_differences

    def scalar(lam, n):
        y, z = lam, torch.ones_like(lam)
        for _ in range(n):
            t = 0.5 * (3 - z * y)
            y, z = y * t, t * z
        return y

    lam = torch.tensor([[0.0, 0.05, 0.2, 0.2, 0.55]], dtype=torch.float64)
    for n in (1, 3, 5):
        values, d = newton_schulz_divided_differences(lam, n, torch.tensor([2.0], dtype=torch.float64))
        f = scalar(lam, n)[0]
        torch.testing.assert_close(values[0], f, rtol=1e-14, atol=1e-14)
        slope = torch.autograd.functional.jacobian(lambda t: scalar(t, n), lam[0]).diagonal()
        for i in range(5):
            for j in range(5):
                ref = slope[i] if lam[0, i] == lam[0, j] else (f[i] - f[j]) / (lam[0, i] - lam[0, j])
                torch.testing.assert_close(d[0, i, j], 2 * ref, rtol=1e-12, atol=1e-14)


def test_a_failing_eigh_falls_back_to_the_newton_schulz_iteration_and_adjoint(monkeypatch, caplog):
    x = torch.randn(2, 6, 9, dtype=torch.float64).relu_()
    upstream = torch.randn(2, 6, 6, dtype=torch.float64)

    def gradient(route):
        xx = x.clone().requires_grad_(True)
        (isqrt_cov(xx, 5, backward=route) * upstream).sum().backward()
        return xx.grad

    expected = gradient("newton_schulz")

    def broken(*args, **kwargs):
        raise torch.linalg.LinAlgError("linalg.eigh: The algorithm failed to converge")

    import importlib
    module = importlib.import_module("finegrained.ops.isqrt")  # the name is also the function's
    monkeypatch.setattr(torch.linalg, "eigh", broken)
    monkeypatch.setattr(module, "_fallback_reported", [])
    with caplog.at_level("WARNING"):
        torch.testing.assert_close(gradient("eigh"), expected, rtol=1e-12, atol=1e-12)
    assert "eigh failed; using the Newton-Schulz iteration and its adjoint" in caplog.text


def _plain_isqrt(x, n):
    """iSQRT-COV written plainly: mean-centred covariance, N full coupled steps, √tr compensation."""
    centred = x - x.mean(dim=2, keepdim=True)
    sigma = centred @ centred.transpose(1, 2) / x.shape[2]
    trace = torch.einsum("bii->b", sigma).view(-1, 1, 1)
    eye = torch.eye(x.shape[1], dtype=x.dtype)
    y, z = sigma / trace, eye
    for _ in range(n):
        t = 0.5 * (3 * eye - z @ y)
        y, z = y @ t, t @ z
    return y * trace.sqrt()


@pytest.mark.parametrize("n", [1, 2, 3, 5])
def test_official_isqrt_baseline_matches_the_plain_formulas(n):
    """(b) is the official algorithm (shortened first and last steps, hand-written backward) and still
    the same function: value and gradient within 1e-9 of the formulas in float64, and gradcheck."""
    g = torch.Generator().manual_seed(n)
    x = torch.randn(3, 6, 10, generator=g, dtype=torch.float64).relu_().requires_grad_(True)
    upstream = torch.randn(3, 6, 6, generator=g, dtype=torch.float64)
    out, ref = baselines.isqrt_official(x, n), _plain_isqrt(x, n)
    (grad,) = torch.autograd.grad((out * upstream).sum(), x)
    (ref_grad,) = torch.autograd.grad((ref * upstream).sum(), x)
    assert (out - ref).abs().max() <= 1e-9 * ref.abs().max()
    assert (grad - ref_grad).abs().max() <= 1e-9 * ref_grad.abs().max()
    assert gradcheck(lambda t: baselines.isqrt_official(t, n), (x,))


def test_official_isqrt_baseline_keeps_the_official_iterates():
    """Y₁ … Y_{N−1}, Z₁ … Z_{N−1}, the per-image M×M centring matrix, X, Σ, A, Y_N and the traces."""
    b, c, m, n = 2, 6, 10, 5
    x = torch.randn(b, c, m).requires_grad_(True)
    matrices = 2 * (n - 1) + 3  # iterates + Σ, A, Y_N
    expected = 4 * (b * c * m + b * m * m + matrices * b * c * c + b)
    assert timing.saved_bytes(lambda t: baselines.isqrt_official(t, n), x) == expected


@pytest.mark.parametrize("route", ROUTES)
def test_fused_isqrt_saves_less_memory_than_autograd(route):
    x = torch.randn(4, 32, 10, 10).relu_().requires_grad_(True)
    fused = timing.saved_bytes(lambda t: isqrt_cov(t, 5, backward=route), x)
    plain = timing.saved_bytes(lambda t: baselines.isqrt_autograd(t, 5), x)
    assert 0 < fused < 0.5 * plain


@pytest.mark.parametrize("channels, positions", [(32, 12), (24, 100)])
@pytest.mark.parametrize("route", ROUTES)
def test_fused_isqrt_float32_is_close_to_float64(channels, positions, route):
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
    out, grad = value_and_grad(lambda t: isqrt_cov(t, 5, backward=route), torch.float32)
    assert (out - ref_out).abs().max() <= 1e-5 * ref_out.abs().max()
    assert (grad - ref_grad).abs().max() <= 1e-5 * ref_grad.abs().max()


@pytest.mark.parametrize("n", [1, 2, 5])
@pytest.mark.parametrize("route", ["newton_schulz", "eigh"])
def test_fused_isqrt_saves_exactly_its_documented_tensors(n, route):
    """Newton–Schulz adjoint: X, A, P_1 … P_{N−1}, Y_{N−1} (N + 1 C×C matrices; A alone when N = 1) and
    the traces; spectral route: X, the eigenvectors U, the eigenvalues and the traces."""
    b, c, m = 3, 8, 20
    x = torch.randn(b, c, m).requires_grad_(True)
    matrices = 1 if route == "eigh" or n == 1 else n + 1
    eigenvalues = b * c if route == "eigh" else 0
    expected = 4 * (b * c * m + matrices * b * c * c + eigenvalues + b)
    assert timing.saved_bytes(lambda t: isqrt_cov(t, n, backward=route), x) == expected


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
    rates = loader["images_per_s_per_core"]
    assert rates.gt(0).all() and loader["pipeline"][0].endswith("(baseline)")
    # speed-up = this pipeline's rate over the baseline's, both measured in the same interleaved rounds
    assert loader["speedup"].tolist() == pytest.approx((rates / rates[0]).tolist(), rel=1e-9)
    assert len(loader) == 3 and loader["pipeline"][2].startswith("WebDataset shards")
    assert {"platform", "torch", "timestamp"} <= set(loader.columns)
    assert set(loader["finegrained"].astype(str)) == {finegrained.__version__}  # the version the numbers are of
    assert main(["bench", "step", "--backbone", "resnet18,timm/vit_small_patch16_224", "--head", "isqrt,sot",
                 "--size", "64", "--batch", "2", "--repeats", "1", "--device", "cpu", "--out", out]) == 0
    step = pd.read_csv(os.path.join(out, "step_cpu.csv"))
    assert list(step["head"]) == ["gap", "isqrt", "sot"] * 2 and step["overhead_vs_gap"].notna().all()
    assert list(step["backbone"]) == ["resnet18"] * 3 + ["timm/vit_small_patch16_224"] * 3
    assert (step.loc[step["head"] == "gap", "overhead_vs_gap"] == 1).all()


def test_bench_table_choices_do_not_depend_on_the_test_split():
    """Shuffled test labels change the test accuracy, never what was chosen or its validation accuracy."""
    from finegrained.bench.table import evaluate_head

    g = torch.Generator().manual_seed(0)
    centres = torch.randn(3, 6, 1, 1, generator=g) * 2

    def split(n):
        labels = torch.arange(n) % 3
        return (centres[labels] + torch.randn(n, 6, 3, 3, generator=g)).relu(), labels

    features = {"classes": ["a", "b", "c"]}
    for name, n in (("train", 60), ("val", 30), ("test", 30)):
        features[name], features[f"{name}_labels"] = split(n)
    shuffled = dict(features, test_labels=features["test_labels"][torch.randperm(30, generator=g)])
    for head in ("gap", "netvlad"):
        honest, blind = evaluate_head(head, features, epochs=1), evaluate_head(head, shuffled, epochs=1)
        assert honest["trained_by"] == blind["trained_by"] and honest["val_top1"] == blind["val_top1"]
        assert "validation_sweep" in honest and honest["validation_sweep"].count(":") >= 3
