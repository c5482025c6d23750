"""``finegrained bench heads``: FP+BP of the second-order heads against their baselines.

FP+BP of a batch (B = 8, C = 256, 28×28 and 14×14 maps, float32) for iSQRT-COV (fused
autograd.Function) against (a) plain autograd through the formulas and (b) the official algorithm
(explicit M×M centring matrix, every iterate stored, per-sample trace loop); MPN-COV (K-matrix
Function) against autograd through ``torch.linalg.eigh``; CBP's hashed Tensor Sketch against the
dense sketch matrix. Also the memory of the tensors saved for backward and the achieved GFLOP/s as
a fraction of the batched-matmul rate measured in the same run (the roofline). Optimised paths are
checked against their baselines first (≤ 1e-5 in float32, ≤ 1e-9 in float64); a mismatch raises.

Seed timings (GPU, AlexNet-size layer, FP+BP): iSQRT N=5 1.41 ms, MPN-COV (EIG) 2.58 ms.
"""
from __future__ import annotations

from typing import Callable, List, Sequence

import torch
from torch import Tensor

from finegrained.bench.baselines import _Sketch, isqrt_autograd, isqrt_official, mpncov_eigh_autograd
from finegrained.bench.timing import interleaved_medians, saved_bytes
from finegrained.ops import covariance, eig_power, isqrt_cov


def _check(name: str, fast: Callable, reference: Callable, x: Tensor, tol: float) -> float:
    """Relative max difference of outputs and input gradients; raises above ``tol``."""
    x1, x2 = x.detach().clone().requires_grad_(True), x.detach().clone().requires_grad_(True)
    out, ref = fast(x1), reference(x2)
    upstream = torch.randn_like(ref)
    (g1,) = torch.autograd.grad((out * upstream).sum(), x1)
    (g2,) = torch.autograd.grad((ref * upstream).sum(), x2)
    out, ref = out.detach(), ref.detach()
    err = max(float((out - ref).abs().max() / ref.abs().max().clamp_min(1e-30)),
              float((g1 - g2).abs().max() / g2.abs().max().clamp_min(1e-30)))
    if not torch.isfinite(out).all() or not torch.isfinite(g1).all():
        raise RuntimeError(f"bench {name}: the optimised path produced NaN or inf")
    if not err <= tol:
        raise RuntimeError(f"bench {name}: optimised path differs from its baseline by {err:.3g} (tolerance {tol:g})")
    return err


def check_parity(device: torch.device, batch: int = 2, channels: int = 16, side: int = 5) -> List[dict]:
    """Every optimised path against its baseline in float32 (1e-5) and float64 (1e-9)."""
    rows = []
    for dtype, tol in ((torch.float32, 1e-5), (torch.float64, 1e-9)):
        g = torch.Generator(device="cpu").manual_seed(0)
        x = torch.randn(batch, channels, side, side, generator=g, dtype=torch.float64).relu_().to(device, dtype)
        sketch = _Sketch(channels, 64, device, dtype)
        pairs = [
            ("isqrt vs (a) autograd", lambda t: isqrt_cov(t, 5), lambda t: isqrt_autograd(t, 5)),
            ("isqrt vs (b) official", lambda t: isqrt_cov(t, 5), lambda t: isqrt_official(t, 5)),
            ("mpncov vs eigh autograd", lambda t: eig_power(covariance(t), 0.5), mpncov_eigh_autograd),
            ("cbp Gram scatter vs dense", sketch.gram, sketch.dense_matrix),
            ("kp/cbp hashed FFT vs dense", sketch.hashed, sketch.dense_matrix),
        ]
        for name, fast, ref in pairs:
            # Eigenvector gradients are conditioned by eigenvalue gaps: compare them in float64 only.
            label = str(dtype).replace("torch.", "")
            if "eigh" in name and dtype == torch.float32:
                err, label, used_tol = _check(name, fast, ref, x.double(), 1e-9), "float64 (for float32)", 1e-9
            else:
                err, used_tol = _check(name, fast, ref, x, tol), tol
            rows.append({"check": name, "dtype": label, "max_rel_error": err, "tolerance": used_tol})
    return rows


_PEAK_BMMS = 16  # batched matmuls per timed call of the roofline case, so that it lasts as long as the heads


def _bmm_peak_case(b: int, d: int, device, dtype) -> Callable[[], None]:
    """The roofline: ``_PEAK_BMMS`` batched (d×d)·(d×d) products, timed among the heads' own rounds."""
    a, c = torch.randn(b, d, d, device=device, dtype=dtype), torch.randn(b, d, d, device=device, dtype=dtype)

    def run():
        for _ in range(_PEAK_BMMS):
            torch.bmm(a, c)
    return run


def _isqrt_flops(b: int, c: int, m: int, n: int) -> float:
    """Matmul flops of the fused iSQRT FP+BP: covariance (fwd, bwd) + Newton–Schulz (fwd 3N−3, bwd 6N−5)."""
    cov = 2 * b * c * c * m
    matmuls = (3 * n - 3) + (6 * n - 5)
    return 2 * cov + matmuls * 2 * b * c ** 3


def bench_heads(device: torch.device, repeats: int = 9, batch: int = 8, channels: int = 256,
                sides: Sequence[int] = (28, 14), autocast: bool = False) -> List[dict]:
    rows = []
    for side in sides:
        m = side * side
        x = torch.randn(batch, channels, side, side, device=device).relu_()

        def fpbp(fn):
            def run():
                xx = x.detach().requires_grad_(True)
                if autocast:
                    with torch.autocast(device.type, dtype=torch.bfloat16):
                        out = fn(xx)
                else:
                    out = fn(xx)
                out.float().sum().backward()
            return run

        sketch = _Sketch(channels, 8192, device, torch.float32)
        cases = {  # x is float32; the heads' matrix functions stay in float32 under autocast too
            "isqrt (fused Function)": lambda t: isqrt_cov(t, 5),
            "isqrt (a) plain autograd": lambda t: isqrt_autograd(t, 5),
            "isqrt (b) official algorithm": lambda t: isqrt_official(t, 5),
            "mpncov (K-matrix Function)": lambda t: eig_power(covariance(t), 0.5),
            "mpncov autograd through eigh": mpncov_eigh_autograd,
            "cbp ts (Gram + scatter)": sketch.gram,
            "cbp ts (hashed sketch + FFT)": sketch.hashed,
            "cbp ts (dense sketch matrix)": sketch.dense_matrix,
        }
        timed = {name: fpbp(fn) for name, fn in cases.items()}
        timed["bmm peak"] = _bmm_peak_case(batch, channels, device, torch.float32)
        timings = interleaved_medians(timed, device, repeats)
        peak = _PEAK_BMMS * 2 * batch * channels ** 3 / timings["bmm peak"] / 1e9
        saved = {name: saved_bytes(fn, x.detach().requires_grad_(True)) / 2 ** 20 for name, fn in cases.items()}
        for name in cases:
            row = {"map": f"{side}x{side}", "case": name, "median_ms": 1e3 * timings[name], "saved_MiB": saved[name]}
            if name.startswith("isqrt"):
                row["vs_(a)"] = timings[name] / timings["isqrt (a) plain autograd"]
                row["vs_(b)"] = timings[name] / timings["isqrt (b) official algorithm"]
                row["mem_vs_(a)"] = saved[name] / saved["isqrt (a) plain autograd"]
            if name == "isqrt (fused Function)":
                row["GFLOP/s"] = _isqrt_flops(batch, channels, m, 5) / timings[name] / 1e9
                row["roofline"] = row["GFLOP/s"] / peak
            if name.startswith("mpncov"):
                row["vs_eigh"] = timings[name] / timings["mpncov autograd through eigh"]
            if name.startswith("cbp"):
                row["vs_dense"] = timings[name] / timings["cbp ts (dense sketch matrix)"]
            row["bmm_peak_GFLOP/s"] = peak
            rows.append(row)
    return rows
