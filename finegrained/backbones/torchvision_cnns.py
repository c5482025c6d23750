"""torchvision's ImageNet CNNs cut at their last convolutional feature map.

========================  =====  ==========================================================
name                      C      cut / paper
========================  =====  ==========================================================
resnet18/34               512    after layer4 -- He et al., "Deep Residual Learning", CVPR 2016
resnet50/101/152          2048   after layer4
vgg16, vgg16_bn           512    relu5_3 without pool5 (s = 16) -- Simonyan & Zisserman, ICLR 2015
densenet121/161/201       1024/  features + ReLU -- Huang et al., "Densely Connected CNNs", CVPR 2017
                          2208/
                          1920
mobilenet_v2              1280   features -- Sandler et al., CVPR 2018
efficientnet_b0           1280   features -- Tan & Le, ICML 2019
========================  =====  ==========================================================

``last_stride=1`` removes the last down-sampling (ResNet's layer4 stride, DenseNet's last
transition pooling, the last stride-2 conv of the mobile networks). ``"imagenet"`` weights are
torchvision's default weights for the name, downloaded once into torch's hub cache.
"""
from __future__ import annotations

import functools
import re
from collections import OrderedDict
from typing import Optional, Sequence

import torchvision
import torchvision.models.vgg as tv_vgg
from torch import nn

from finegrained.backbones import register_backbone
from finegrained.backbones.base import (Backbone, LayerOutputs, last_stride2_conv, remove_stride, stride2_convs,
                                        vgg_layer_names)
from finegrained.backbones.weights import StateDict, Weights, hub_cached_file, load_weights


def _imagenet_file(name: str) -> str:
    url = torchvision.models.get_model_weights(name).DEFAULT.url
    return hub_cached_file(url, f"ImageNet weights for {name!r}")


def _torchvision_model(name: str, weights: Weights, feature_prefixes, fix_keys=None) -> nn.Module:
    """The full torchvision network ``name`` with ``weights`` loaded."""
    model = torchvision.models.get_model(name, weights=None)
    return load_weights(model, name, weights, feature_prefixes, functools.partial(_imagenet_file, name), fix_keys)


# Old torchvision DenseNet checkpoints name layers "norm.1" instead of "norm1".
_DENSENET_KEY = re.compile(
    r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var))$")


def _fix_densenet_keys(state: StateDict) -> StateDict:
    out = OrderedDict()
    for key, value in state.items():
        match = _DENSENET_KEY.match(key)
        out[match.group(1) + match.group(2) if match else key] = value
    return out


@register_backbone("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")
def resnet(name: str, weights: Weights, last_stride: int) -> Backbone:
    model = _torchvision_model(name, weights, ["conv1", "bn1", "layer"])
    if last_stride == 1:
        for conv in stride2_convs(model.layer4):  # the block's conv and its shortcut
            remove_stride(conv)
    features = nn.Sequential(OrderedDict(
        (k, getattr(model, k)) for k in ["conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4"]))
    return Backbone(features, model.fc.in_features, name)


class _VGGFeatures(nn.Module):
    """torchvision's VGG without its classifier: the three fully connected layers (124M parameters, 0.5 GB) that a
    backbone cuts away are never built. Random weights are drawn as torchvision's ``VGG.__init__`` draws them
    (Kaiming-normal convolutions, fan-out, zero biases; BN at 1 and 0)."""

    def __init__(self, batch_norm: bool):
        super().__init__()
        self.features = tv_vgg.make_layers(tv_vgg.cfgs["D"], batch_norm=batch_norm)
        for m in self.features.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)


def _without_vgg_classifier(state: StateDict) -> StateDict:
    """A full VGG state dict (torchvision's file, or a user's) without the classifier the backbone does not build;
    other keys stay, so that a state dict of another network is still refused."""
    return OrderedDict((k, v) for k, v in state.items() if not k.startswith("classifier."))


@register_backbone("vgg16", "vgg16_bn")
def vgg(name: str, weights: Weights, last_stride: int, layers: Optional[Sequence[str]] = None) -> Backbone:
    """relu5_3 without pool5 (s = 16), or the outputs of ``layers`` (e.g. ``["relu5_2", "relu5_3"]``)."""
    if last_stride == 1:
        raise ValueError(f"{name} already ends at relu5_3 without pool5 (stride 16); last_stride must be 2")
    model = load_weights(_VGGFeatures(batch_norm=name.endswith("_bn")), name, weights, ["features"],
                         functools.partial(_imagenet_file, name), _without_vgg_classifier)
    if not layers:
        return Backbone(model.features[:-1], 512, name)  # drop pool5
    names = vgg_layer_names(model.features)
    unknown = [layer for layer in layers if layer not in names]
    if unknown:
        raise ValueError(f"{name} has no layer(s) {unknown}; known: {', '.join(names)}")
    channels = [_channels_at(model.features, names[layer]) for layer in layers]
    order = sorted(range(len(layers)), key=lambda i: names[layers[i]])
    if order != list(range(len(layers))):
        raise ValueError(f"list the layers in network order, got {list(layers)}")
    return Backbone(LayerOutputs(model.features, [names[layer] for layer in layers]), channels, name)


def _channels_at(features: nn.Sequential, index: int) -> int:
    return [m for m in features[:index + 1] if isinstance(m, nn.Conv2d)][-1].out_channels


@register_backbone("densenet121", "densenet161", "densenet201")
def densenet(name: str, weights: Weights, last_stride: int) -> Backbone:
    model = _torchvision_model(name, weights, ["features"], fix_keys=_fix_densenet_keys)
    if last_stride == 1:
        model.features.transition3.pool = nn.Identity()
    # torchvision applies the final ReLU in forward(), not inside `features`.
    return Backbone(nn.Sequential(model.features, nn.ReLU(inplace=True)), model.classifier.in_features, name)


@register_backbone("mobilenet_v2", "efficientnet_b0")
def mobile(name: str, weights: Weights, last_stride: int) -> Backbone:
    model = _torchvision_model(name, weights, ["features"])
    if last_stride == 1:
        remove_stride(last_stride2_conv(model.features))
    return Backbone(model.features, 1280, name)
