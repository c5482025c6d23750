"""``finegrained bench heads``: FP+BP of the second-order heads against their baselines.

FP+BP of a batch (B = 8, C = 256, 28×28 and 14×14 maps, float32, each case in interleaved rounds with
the other cases of its group) for iSQRT-COV (fused autograd.Function, with each of its two backwards:
the spectral one that CPUs use and the Newton–Schulz one that CUDA uses; MPA-Lya and MTP-Lya timed
beside it) against (a) plain autograd through the formulas and (b) the official
fast-MPN-COV algorithm (explicit M×M centring matrix, shortened first and last steps, Y₁ … Y_{N−1} and
Z₁ … Z_{N−1} stored, hand-written backward, per-sample trace loop); MPN-COV (K-matrix
Function) against autograd through ``torch.linalg.eigh``; CBP's hashed Tensor Sketch against the
dense sketch matrix. Also the memory of the tensors saved for backward and the achieved GFLOP/s as
a fraction of the batched-matmul rate measured in the same run (the roofline). Optimised paths are
checked against their baselines first (≤ 1e-5 in float32, ≤ 1e-9 in float64); a mismatch raises.

Seed timings (GPU, AlexNet-size layer, FP+BP): iSQRT N=5 1.41 ms, MPN-COV (EIG) 2.58 ms.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Sequence, Tuple

import torch
from torch import Tensor

from finegrained.bench.baselines import _Sketch, isqrt_autograd, isqrt_official, mpncov_eigh_autograd
from finegrained.bench.timing import interleaved_medians, saved_bytes
from finegrained.ops import covariance, eig_power, isqrt_cov, sqrtm_pade


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


@dataclass(frozen=True)
class Case:
    """One function timed by ``bench heads``: its printed label and what its row is compared with."""

    label: str
    ratios: Tuple[Tuple[str, str], ...] = ()  # (column, baseline key): median time / the baseline's
    memory_ratios: Tuple[Tuple[str, str], ...] = ()  # (column, baseline key): saved memory / the baseline's
    roofline: bool = False  # achieved GFLOP/s against the batched-matmul rate of the same run
    # Cases are interleaved with their own group only: CBP's dense sketch allocates ~800 MB per call,
    # and whichever case followed it in a round would pay for the freed memory being faulted back in.
    group: str = "matrix"


_ISQRT_RATIOS = (("vs_(a)", "isqrt_autograd"), ("vs_(b)", "isqrt_official"))
_ISQRT_MEMORY = (("mem_vs_(a)", "isqrt_autograd"),)
CASES: Dict[str, Case] = {
    "isqrt_fused_eigh": Case("isqrt fused, eigh backward", _ISQRT_RATIOS, _ISQRT_MEMORY),
    "isqrt_fused_ns": Case("isqrt fused, Newton-Schulz backward", _ISQRT_RATIOS, _ISQRT_MEMORY, roofline=True),
    "isqrt_autograd": Case("isqrt (a) plain autograd", _ISQRT_RATIOS, _ISQRT_MEMORY),
    "isqrt_official": Case("isqrt (b) official algorithm", _ISQRT_RATIOS, _ISQRT_MEMORY),
    # Beside iSQRT: Σ^½ by MPA-Lya / MTP-Lya (Song et al., ICLR 2022), covariance included as in the fused case.
    "mpa_lya": Case("mpa-lya (Padé fwd, Lyapunov bwd)", (("vs_isqrt", "isqrt_fused_ns"),)),
    "mtp_lya": Case("mtp-lya (Taylor fwd, Lyapunov bwd)", (("vs_isqrt", "isqrt_fused_ns"),)),
    "mpncov_kmatrix": Case("mpncov (K-matrix Function)", (("vs_eigh", "mpncov_eigh"),)),
    "mpncov_eigh": Case("mpncov autograd through eigh", (("vs_eigh", "mpncov_eigh"),)),
    "cbp_gram": Case("cbp ts (Gram + scatter)", (("vs_dense", "cbp_dense"),), group="sketch"),
    "cbp_hashed": Case("cbp ts (hashed sketch + FFT)", (("vs_dense", "cbp_dense"),), group="sketch"),
    "cbp_dense": Case("cbp ts (dense sketch matrix)", (("vs_dense", "cbp_dense"),), group="sketch"),
}

# (label, optimised case, baseline case, compare in float64 only). Eigenvector gradients are
# conditioned by eigenvalue gaps, so the eigh pair is compared in float64 for float32 too.
PARITY_PAIRS = (("isqrt eigh bwd vs (a) autograd", "isqrt_fused_eigh", "isqrt_autograd", False),
                ("isqrt NS bwd vs (a) autograd", "isqrt_fused_ns", "isqrt_autograd", False),
                ("isqrt vs (b) official", "isqrt_fused_ns", "isqrt_official", False),
                ("(b) official vs (a) autograd", "isqrt_official", "isqrt_autograd", False),
                ("mpncov vs eigh autograd", "mpncov_kmatrix", "mpncov_eigh", True),
                ("cbp Gram scatter vs dense", "cbp_gram", "cbp_dense", False),
                ("kp/cbp hashed FFT vs dense", "cbp_hashed", "cbp_dense", False))


def case_functions(channels: int, sketch_dim: int, device, dtype) -> Dict[str, Callable[[Tensor], Tensor]]:
    """The function of every case of :data:`CASES`, features (B, C, H, W) in."""
    sketch = _Sketch(channels, sketch_dim, device, dtype)
    return {
        "isqrt_fused_eigh": lambda t: isqrt_cov(t, 5, backward="eigh"),
        "isqrt_fused_ns": lambda t: isqrt_cov(t, 5, backward="newton_schulz"),
        "isqrt_autograd": lambda t: isqrt_autograd(t, 5),
        "isqrt_official": lambda t: isqrt_official(t, 5),
        "mpa_lya": lambda t: sqrtm_pade(covariance(t), "mpa"),
        "mtp_lya": lambda t: sqrtm_pade(covariance(t), "mtp"),
        "mpncov_kmatrix": lambda t: eig_power(covariance(t), 0.5),
        "mpncov_eigh": mpncov_eigh_autograd,
        "cbp_gram": sketch.gram,
        "cbp_hashed": sketch.hashed,
        "cbp_dense": sketch.dense_matrix,
    }


def check_parity(device: torch.device, batch: int = 2, channels: int = 16, side: int = 5) -> List[dict]:
    """Every optimised path against its baseline in float32 (1e-5) and float64 (1e-9)."""
    rows = []
    for dtype, tol in ((torch.float32, 1e-5), (torch.float64, 1e-9)):
        g = torch.Generator(device="cpu").manual_seed(0)
        x = torch.randn(batch, channels, side, side, generator=g, dtype=torch.float64).relu_().to(device, dtype)
        functions = case_functions(channels, 64, device, dtype)
        for name, fast, baseline, float64_only in PARITY_PAIRS:
            label = str(dtype).replace("torch.", "")
            if float64_only and dtype == torch.float32:
                err = _check(name, functions[fast], functions[baseline], x.double(), 1e-9)
                label, used_tol = "float64 (for float32)", 1e-9
            else:
                err, used_tol = _check(name, functions[fast], functions[baseline], x, tol), tol
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
    """Matmul flops of the fused iSQRT FP+BP with the Newton–Schulz backward: covariance (fwd, bwd) +
    Newton–Schulz (fwd 3N−3, bwd 6N−5). (The eigh backward has no matmul count to compare with.)"""
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

        # x is float32; the heads' matrix functions stay in float32 under autocast too
        functions = case_functions(channels, 8192, device, torch.float32)
        timings = {}
        for group in dict.fromkeys(case.group for case in CASES.values()):
            timed = {key: fpbp(functions[key]) for key, case in CASES.items() if case.group == group}
            if group == "matrix":
                timed["bmm peak"] = _bmm_peak_case(batch, channels, device, torch.float32)
            timings.update(interleaved_medians(timed, device, repeats))
        peak = _PEAK_BMMS * 2 * batch * channels ** 3 / timings["bmm peak"] / 1e9
        saved = {key: saved_bytes(fn, x.detach().requires_grad_(True)) / 2 ** 20 for key, fn in functions.items()}
        for key, case in CASES.items():
            row = {"map": f"{side}x{side}", "case": case.label, "median_ms": 1e3 * timings[key], "saved_MiB": saved[key]}
            row.update({column: timings[key] / timings[base] for column, base in case.ratios})
            row.update({column: saved[key] / saved[base] for column, base in case.memory_ratios})
            if case.roofline:
                row["GFLOP/s"] = _isqrt_flops(batch, channels, m, 5) / timings[key] / 1e9
                row["roofline"] = row["GFLOP/s"] / peak
            row["bmm_peak_GFLOP/s"] = peak
            rows.append(row)
    return rows


def time_ratio(rows: List[dict], side: int, case: str, baseline: str) -> float:
    """Median time of ``case`` over that of ``baseline`` (keys of :data:`CASES`) on the side×side map of ``rows``."""
    times = {row["case"]: row["median_ms"] for row in rows if row["map"] == f"{side}x{side}"}
    return times[CASES[case].label] / times[CASES[baseline].label]
