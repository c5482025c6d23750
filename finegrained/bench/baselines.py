"""The baselines that the optimised matrix functions are measured and checked against.

Bench code, not library code: nothing in the library calls them.

* :func:`isqrt_autograd` -- (a) the iSQRT-COV formulas through plain autograd, no shortcuts.
* :func:`isqrt_official` -- (b) the official iSQRT-COV algorithm (Li et al., CVPR 2018, the
  fast-MPN-COV code) with its hand-written backward.
* :func:`mpncov_eigh_autograd` -- MPN-COV's square root by autograd through ``torch.linalg.eigh``.
* :class:`_Sketch` -- CBP's two count sketches in three implementations (Gram + scatter, hashed
  sketch + FFT, dense sketch matrix).

Shapes: features (B, C, H, W) -> (B, C, C), or (B, d) for the sketches.
"""
from __future__ import annotations

import torch
from torch import Tensor

from finegrained.ops import (CountSketches, covariance, full_precision, sym, tensor_sketch, tensor_sketch_gram,
                             tensor_sketch_hashed)
from finegrained.ops.backward import first_order_only


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
    """(b): the official fast-MPN-COV algorithm, as its CovPool and Sqrtm layers compute it.

    * Σ = X Ī Xᵀ with an explicit M×M centring matrix Ī = (1/M)(I − (1/M)11ᵀ), one copy per image,
      used in both passes.
    * A = Σ / tr Σ; first step Z₁ = ½(3I − A), Y₁ = A Z₁ (one matmul); steps 2 … N−1 in full
      (T = ½(3I − Z Y), Y ← Y T, Z ← T Z); last step Y_N = ½ Y_{N−1}(3I − Z_{N−1} Y_{N−1}), no Z:
      3N − 3 matmuls. Y₁ … Y_{N−1} and Z₁ … Z_{N−1} are kept for backward.
    * Backward: the per-step adjoints of the iSQRT-COV paper over the stored iterates (6 matmuls for
      the last step, 10 for each full step, 2 for the first: 38 at N = 5), then the trace terms of
      pre-normalisation and post-compensation added to the diagonal sample by sample.
    """

    @staticmethod
    def forward(ctx, x, iterations):
        b, c, m = x.shape
        centring = ((-1.0 / m / m) * torch.ones(m, m, dtype=x.dtype, device=x.device)
                    + (1.0 / m) * torch.eye(m, dtype=x.dtype, device=x.device)).repeat(b, 1, 1)
        sigma = x.bmm(centring).bmm(x.transpose(1, 2))
        eye3 = 3.0 * torch.eye(c, dtype=x.dtype, device=x.device).repeat(b, 1, 1)
        trace = sigma.diagonal(dim1=1, dim2=2).sum(-1)
        a = sigma / trace.view(b, 1, 1)
        ys, zs = [], []
        if iterations < 2:
            y_last = a.bmm(0.5 * (eye3 - a))
        else:
            zs.append(0.5 * (eye3 - a))
            ys.append(a.bmm(zs[0]))
            for _ in range(iterations - 2):
                t = 0.5 * (eye3 - zs[-1].bmm(ys[-1]))
                ys.append(ys[-1].bmm(t))
                zs.append(t.bmm(zs[-1]))
            y_last = 0.5 * ys[-1].bmm(eye3 - zs[-1].bmm(ys[-1]))
        ctx.save_for_backward(x, centring, sigma, a, y_last, trace, *ys, *zs)
        ctx.iterations = iterations
        return y_last * trace.sqrt().view(b, 1, 1)

    @staticmethod
    @first_order_only("isqrt_official")
    def backward(ctx, grad):
        x, centring, sigma, a, y_last, trace, *iterates = ctx.saved_tensors
        n = ctx.iterations
        ys, zs = iterates[:len(iterates) // 2], iterates[len(iterates) // 2:]
        b, c, _ = x.shape
        eye3 = 3.0 * torch.eye(c, dtype=x.dtype, device=x.device).repeat(b, 1, 1)
        g_post = grad * trace.sqrt().view(b, 1, 1)
        post_aux = (grad * y_last).sum(dim=(1, 2)) / (2 * trace.sqrt())
        if n < 2:
            g_a = 0.5 * (g_post.bmm(eye3 - a) - a.bmm(g_post))
        else:
            y, z = ys[-1], zs[-1]
            g_y = 0.5 * (g_post.bmm(eye3 - y.bmm(z)) - z.bmm(y).bmm(g_post))
            g_z = -0.5 * y.bmm(g_post).bmm(y)
            for k in range(n - 3, -1, -1):
                y, z = ys[k], zs[k]
                yz, zy = eye3 - y.bmm(z), z.bmm(y)
                g_y, g_z = (0.5 * (g_y.bmm(yz) - z.bmm(g_z).bmm(z) - zy.bmm(g_y)),
                            0.5 * (yz.bmm(g_z) - y.bmm(g_y).bmm(y) - g_z.bmm(zy)))
            g_a = 0.5 * (g_y.bmm(eye3 - a) - g_z - a.bmm(g_y))
        g_a = g_a.transpose(1, 2)
        g_sigma = g_a / trace.view(b, 1, 1)
        pre_aux = (g_a * sigma).sum(dim=(1, 2))
        for i in range(b):  # the official per-sample diagonal loop
            g_sigma[i] += (post_aux[i] - pre_aux[i] / (trace[i] * trace[i])) * torch.ones(
                c, dtype=x.dtype, device=x.device).diag()
        g_x = (g_sigma + g_sigma.transpose(1, 2)).bmm(x).bmm(centring)
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
