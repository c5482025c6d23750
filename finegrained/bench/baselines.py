"""The baselines that the optimised matrix functions are measured and checked against.

Bench code, not library code: nothing in the library calls them.

* :func:`isqrt_autograd` -- (a) the iSQRT-COV formulas through plain autograd, no shortcuts.
* :func:`isqrt_official` -- (b) the official iSQRT-COV algorithm (Li et al., CVPR 2018) with its
  hand-written backward.
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
    @first_order_only("isqrt_official")
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
