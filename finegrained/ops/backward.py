"""A rule shared by the hand-written backward passes: first derivatives only.

The custom ``autograd.Function``s here (fused iSQRT-COV, the K-matrix eigendecomposition backward,
the Lyapunov backward of improved B-CNN) compute exact first derivatives by formulas that autograd
cannot differentiate again. ``torch.autograd.function.once_differentiable`` is not enough: a second
derivative with respect to the input then comes out as silent zeros. :func:`first_order_only`
refuses ``create_graph=True`` with an error instead.
"""
from __future__ import annotations

import functools

import torch


def first_order_only(name: str):
    """Decorate a custom Function's ``backward`` so that double backward raises a clear error."""

    def decorate(backward):
        @functools.wraps(backward)
        def wrapper(ctx, *grads):
            if torch.is_grad_enabled():  # autograd enables grad mode in backward only for create_graph=True
                raise RuntimeError(
                    f"{name}: cannot differentiate twice (double backward / create_graph=True): its backward is "
                    f"hand-written and has no derivative of its own; use the plain formulas for second derivatives")
            return backward(ctx, *grads)

        return wrapper

    return decorate
