"""Pooling heads: one small module per method, and one factory.

Every head is an ``nn.Module`` mapping a (B, C, H, W) feature map to (B, ``head.output_dim``).
A head that computes class scores itself (e.g. low-rank bilinear pooling) sets
``produces_logits = True``; the classifier then uses it as its last layer.

    >>> head = build_head("isqrt", in_channels=2048)           # 1x1 conv to 256 + iSQRT
    >>> head.output_dim
    32896

Heads built on an eigendecomposition (``mpncov``, ``o2p``, ``g2de``) carry an eigendecomposition-free
substitute for ONNX, which has no eigensolver; :func:`onnx_substitutes` switches it on.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Dict, Iterator, List, Optional

from torch import nn

_REGISTRY: Dict[str, Callable[..., nn.Module]] = {}


def register_head(name: str):
    """Class decorator that makes a head available to :func:`build_head` under ``name``."""

    def wrap(cls):
        if name in _REGISTRY:
            raise ValueError(f"head {name!r} is registered twice")
        _REGISTRY[name] = cls
        return cls

    return wrap


def available_heads() -> List[str]:
    """Names accepted by :func:`build_head`, sorted."""
    return sorted(_REGISTRY)


def build_head(name: str, in_channels: int, num_classes: Optional[int] = None, **kwargs) -> nn.Module:
    """Build the pooling head ``name`` for feature maps with ``in_channels`` channels.

    ``num_classes`` is passed only to heads that compute class scores themselves
    (``produces_logits = True``, e.g. ``lrbp``); the others ignore it.

    Raises:
        ValueError: for an unknown name (the message lists the known ones), or a logit-producing
            head without ``num_classes``.
    """
    try:
        cls = _REGISTRY[name]
    except KeyError:
        raise ValueError(
            f"unknown head {name!r}; known heads: {', '.join(available_heads())}"
        ) from None
    if getattr(cls, "produces_logits", False):
        if num_classes is None:
            raise ValueError(f"head {name!r} computes class scores itself and needs num_classes")
        return cls(in_channels, num_classes=num_classes, **kwargs)
    return cls(in_channels, **kwargs)


@contextlib.contextmanager
def onnx_substitutes(module: nn.Module) -> Iterator[List[str]]:
    """Inside the block, eigendecomposition heads in ``module`` compute their ONNX substitute.

    Yields the descriptions of the substitutes in use (empty when ``module`` has none).
    """
    heads = [m for m in module.modules() if hasattr(m, "use_substitute")]
    previous = [m.use_substitute for m in heads]
    for m in heads:
        m.use_substitute = True
    try:
        yield [m.substitute_description() for m in heads]
    finally:
        for m, flag in zip(heads, previous):
            m.use_substitute = flag


# Importing the modules registers the heads.
from finegrained.heads import (  # noqa: E402,F401
    bcnn, cbp, g2de, gap, gmsop, hihca, improved_bcnn, isqrt, kp, lrbp, mpncov, netfv, netvlad, o2p, srsop)
