"""``finegrained bench heads|loader|step``: measured speed, against baselines measured in the same run.

Every number is a median over repeats, timed in interleaved rounds (each round runs every case once);
ratios compare with baselines timed in the same process,
never with remembered numbers. Each subcommand prints a table and writes a CSV with the machine's
description under ``results/bench/``. Optimised paths are checked against their baselines inside
the bench (≤ 1e-5 in float32, ≤ 1e-9 in float64); a mismatch raises and fails the command.

* ``heads``: FP+BP of a batch (B = 8, C = 256, 28×28 and 14×14 maps, float32) for iSQRT-COV (fused
  autograd.Function) against (a) plain autograd through the formulas and (b) the official algorithm
  (explicit M×M centring matrix, every iterate stored, per-sample trace loop); MPN-COV (K-matrix
  Function) against autograd through ``torch.linalg.eigh``; CBP's hashed Tensor Sketch against the
  dense sketch matrix. Also the memory of the tensors saved for backward and the achieved GFLOP/s as
  a fraction of the batched-matmul rate measured in the same run (the roofline).
* ``loader``: images/s per core to decode and transform 1600×1067 JPEGs to 448 crops, the project's
  pipeline (JPEG draft decoding) against plain PIL + torchvision.
* ``step``: training-step images/s of backbone + head against backbone + GAP.

Seed timings (GPU, AlexNet-size layer, FP+BP): iSQRT N=5 1.41 ms, MPN-COV (EIG) 2.58 ms.
"""
from __future__ import annotations

import datetime
import os
import platform
import statistics
import time
from typing import Callable, Dict, List, Optional, Sequence

import pandas as pd
import torch
from torch import Tensor

from finegrained.heads.cbp import CountSketches
from finegrained.linalg import (covariance, eig_power, full_precision, isqrt_cov, sym, tensor_sketch,
                                tensor_sketch_gram, tensor_sketch_hashed)

# ------------------------------------------------------------------------------------------ utils


def machine_info(device: torch.device) -> Dict[str, str]:
    info = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu_count": str(os.cpu_count()), "torch_threads": str(torch.get_num_threads()),
            "torch": torch.__version__, "device": str(device)}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved_medians(fns: Dict[str, Callable[[], None]], device: torch.device, repeats: int,
                        warmup: int = 2) -> Dict[str, float]:
    """Median seconds of each function, timed in rounds that run every function once.

    Ratios are taken between these medians; interleaving makes a slow drift of a shared machine
    (another tenant, frequency scaling) hit the case and its baseline alike instead of whichever
    happened to run during it.
    """
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    _sync(device)
    samples: Dict[str, List[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            _sync(device)
            samples[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in samples.items()}


def saved_bytes(fn: Callable[[Tensor], Tensor], x: Tensor) -> int:
    """Bytes of the distinct storages that autograd saves for backward while computing fn(x)."""
    storages: Dict[int, int] = {}

    def pack(t: Tensor):
        storage = t.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn(x)
    del out
    return sum(storages.values())


def write_csv(rows: List[dict], name: str, device: torch.device, out_dir: str) -> str:
    os.makedirs(out_dir, exist_ok=True)
    stamp = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    frame = pd.DataFrame(rows)
    for key, value in machine_info(device).items():
        frame[key] = value
    frame["timestamp"] = stamp
    path = os.path.join(out_dir, f"{name}_{device.type}.csv")
    frame.to_csv(path, index=False)
    return path


# ------------------------------------------------------------------------------------ baselines
def isqrt_autograd(x: Tensor, iterations: int = 5) -> Tensor:
    """(a): the iSQRT-COV formulas, plain autograd, no shortcuts."""
    x = x.flatten(2)
    centred = x - x.mean(dim=2, keepdim=True)
    sigma = centred @ centred.transpose(1, 2) / x.shape[-1]
    trace = sigma.diagonal(dim1=1, dim2=2).sum(-1).view(-1, 1, 1)
    eye = torch.eye(sigma.shape[-1], dtype=x.dtype, device=x.device)
    y, z = sigma / trace, eye.expand_as(sigma)
    for _ in range(iterations):
        t = 0.5 * (3 * eye - z @ y)
        y, z = y @ t, t @ z
    return y * trace.sqrt()


class _OfficialISqrt(torch.autograd.Function):
    """(b): the official algorithm as methods.md describes it: Σ = X Ī Xᵀ with an explicit M×M
    centring matrix Ī = (1/M)(I − (1/M)11ᵀ), all Y_k and Z_k stored, and the trace-term gradient
    added to the diagonal in a Python loop over the batch."""

    @staticmethod
    def forward(ctx, x, iterations):
        b, c, m = x.shape
        centring = (torch.eye(m, dtype=x.dtype, device=x.device) - 1.0 / m) / m
        sigma = x @ centring.expand(b, m, m) @ x.transpose(1, 2)
        trace = sigma.diagonal(dim1=1, dim2=2).sum(-1).view(b, 1, 1)
        a = sigma / trace
        eye = torch.eye(c, dtype=x.dtype, device=x.device).expand(b, c, c)
        ys, zs = [a], [eye]
        for _ in range(iterations):
            t = 0.5 * (3 * eye - zs[-1] @ ys[-1])
            ys.append(ys[-1] @ t)
            zs.append(t @ zs[-1])
        out = ys[-1] * trace.sqrt()
        ctx.save_for_backward(x, centring, a, trace, torch.stack(ys), torch.stack(zs))
        ctx.iterations = iterations
        return out

    @staticmethod
    def backward(ctx, grad):
        x, centring, a, trace, ys, zs = ctx.saved_tensors
        b, c, _ = x.shape
        eye = torch.eye(c, dtype=x.dtype, device=x.device).expand(b, c, c)
        g_y = grad * trace.sqrt()
        g_z = torch.zeros_like(g_y)
        for k in range(ctx.iterations, 0, -1):
            y, z = ys[k - 1], zs[k - 1]
            zy = z @ y
            g_y_prev = 0.5 * (g_y @ (3 * eye - y @ z) - z @ g_z @ z - zy @ g_y)
            g_z_prev = 0.5 * ((3 * eye - y @ z) @ g_z - y @ g_y @ y - g_z @ zy)
            g_y, g_z = g_y_prev, g_z_prev
        g_a = g_y
        g_sigma = g_a / trace
        post = (grad * ys[-1]).sum(dim=(1, 2)) / (2 * trace.view(-1).sqrt())
        pre = (g_a * a).sum(dim=(1, 2)) / trace.view(-1)
        for i in range(b):  # the official per-sample diagonal loop
            g_sigma[i] += (post[i] - pre[i]) * torch.eye(c, dtype=x.dtype, device=x.device)
        g_x = (g_sigma + g_sigma.transpose(1, 2)) @ x @ centring.expand(b, -1, -1)
        return g_x, None


@full_precision  # the heads' own autocast rule, for the baseline too
def isqrt_official(x: Tensor, iterations: int = 5) -> Tensor:
    return _OfficialISqrt.apply(x.flatten(2), iterations)


def mpncov_eigh_autograd(x: Tensor) -> Tensor:
    sigma = covariance(x)
    lam, u = torch.linalg.eigh(sym(sigma))
    return u @ torch.diag_embed(lam.clamp_min(0).sqrt()) @ u.transpose(1, 2)


class _Sketch:
    """CBP's two count sketches (the head's own :class:`CountSketches`) in three implementations."""

    def __init__(self, channels: int, dim: int, device, dtype):
        self.sketches = CountSketches(channels, dim, 2, seed=0).to(device)
        self.dense = self.sketches.matrices(dtype)

    def hashed(self, x):
        s = self.sketches
        return tensor_sketch_hashed(x, s.hashes, s.signs, s.out_dim)[0]

    def gram(self, x):
        s = self.sketches
        return tensor_sketch_gram(x, s.hashes, s.signs, s.out_dim)

    def dense_matrix(self, x):
        return tensor_sketch(x, self.dense)[0]


# ----------------------------------------------------------------------------------- heads bench
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


# ---------------------------------------------------------------------------------- loader bench
def _sample_jpegs(folder: str, n: int, size=(1600, 1067)) -> List[str]:
    """n JPEGs of real photos (scikit-image's samples when installed) enlarged to ``size``, quality 90."""
    import numpy as np
    from PIL import Image

    os.makedirs(folder, exist_ok=True)
    photos = []
    try:
        from skimage import data

        for name in ("chelsea", "coffee", "astronaut", "rocket", "cat", "hubble_deep_field"):
            if hasattr(data, name):
                photos.append(getattr(data, name)())
    except Exception:  # scikit-image is a dev extra; fall back to smooth synthetic scenes
        pass
    if not photos:
        yy, xx = np.mgrid[0:480, 0:640]
        photos = [np.stack([(xx * (k + 1)) % 255, (yy * 2 + k * 40) % 255, ((xx + yy) // 3) % 255], -1).astype(np.uint8)
                  for k in range(4)]
    paths = []
    for k in range(n):
        path = os.path.join(folder, f"photo_{k}.jpg")
        if not os.path.isfile(path):
            image = Image.fromarray(photos[k % len(photos)]).convert("RGB").resize(size, Image.BICUBIC)
            image.save(path, quality=90)
        paths.append(path)
    return paths


def bench_loader(folder: str, n: int = 24, repeats: int = 5, resize: int = 448, crop: int = 448) -> List[dict]:
    from PIL import Image
    from torchvision import transforms

    from datamodules.io import decode_rgb
    from datamodules.transforms import train_transform

    paths = _sample_jpegs(folder, n)
    ours = train_transform(resize, crop)
    plain = transforms.Compose([
        transforms.Resize(resize), transforms.RandomCrop(crop), transforms.RandomHorizontalFlip(),
        transforms.ToTensor(), transforms.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        def project():
            for p in paths:
                ours(decode_rgb(p, resize=resize)[0])

        def baseline():
            for p in paths:
                with Image.open(p) as im:
                    plain(im.convert("RGB"))

        timings = interleaved_medians({"ours": project, "plain": baseline}, torch.device("cpu"), repeats, warmup=1)
        t_ours, t_plain = timings["ours"], timings["plain"]
    finally:
        torch.set_num_threads(threads)
    return [{"pipeline": "PIL + torchvision (baseline)", "images_per_s_per_core": n / t_plain, "speedup": 1.0},
            {"pipeline": "finegrained (JPEG draft decode)", "images_per_s_per_core": n / t_ours,
             "speedup": t_plain / t_ours}]


# ------------------------------------------------------------------------------------ step bench
def bench_step(device: torch.device, backbone: str = "resnet50", head: str = "isqrt", size: int = 448,
               batch: int = 2, repeats: int = 3, autocast: bool = False) -> List[dict]:
    from finegrained.backbones import build_backbone
    from finegrained.heads import build_head

    rows = []
    last_stride = 2 if backbone.startswith("vgg") else 1  # VGG already ends at relu5_3 (stride 16)
    net = build_backbone(backbone, weights=None, last_stride=last_stride).to(device)
    images = torch.randn(batch, 3, size, size, device=device)
    labels = torch.zeros(batch, dtype=torch.long, device=device)
    if device.type == "cuda":  # the published GPU setting: channels_last, bf16 autocast
        net = net.to(memory_format=torch.channels_last)
        images = images.to(memory_format=torch.channels_last)
    steps = {}
    for name in ("gap", head):
        pool = build_head(name, net.out_channels).to(device)
        fc = torch.nn.Linear(pool.output_dim, 10).to(device)
        opt = torch.optim.SGD(list(net.parameters()) + list(pool.parameters()) + list(fc.parameters()),
                              lr=1e-3, momentum=0.9)

        def step(pool=pool, fc=fc, opt=opt):
            opt.zero_grad(set_to_none=True)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
                logits = fc(pool(net(images)))
            torch.nn.functional.cross_entropy(logits.float(), labels).backward()
            opt.step()

        steps[name] = step
    timings = interleaved_medians(steps, device, repeats, warmup=1)
    for name in steps:
        rows.append({"backbone": backbone, "head": name, "size": size, "batch": batch,
                     "images_per_s": batch / timings[name], "overhead_vs_gap": timings[name] / timings["gap"]})
    return rows


def format_rows(rows: List[dict]) -> str:
    frame = pd.DataFrame(rows)
    return frame.to_markdown(index=False, floatfmt=".3g")
