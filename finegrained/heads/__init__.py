"""Pooling heads: one small module per method, and one factory.

Every head is an ``nn.Module`` mapping a (B, C, H, W) feature map to (B, ``head.output_dim``).
A head that computes class scores itself (e.g. low-rank bilinear pooling) sets
``produces_logits = True``; the classifier then uses it as its last layer.

    >>> head = build_head("isqrt", in_channels=2048)           # 1x1 conv to 256 + iSQRT
    >>> head.output_dim
    32896
"""
from __future__ import annotations

from typing import Callable, Dict, List

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


def build_head(name: str, in_channels: int, **kwargs) -> nn.Module:
    """Build the pooling head ``name`` for feature maps with ``in_channels`` channels.

    Raises:
        ValueError: for an unknown name; the message lists the known ones.
    """
    try:
        cls = _REGISTRY[name]
    except KeyError:
        raise ValueError(
            f"unknown head {name!r}; known heads: {', '.join(available_heads())}"
        ) from None
    return cls(in_channels, **kwargs)


# Importing the modules registers the heads.
from finegrained.heads import bcnn, gap, isqrt  # noqa: E402,F401
