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
transition pooling, the last stride-2 conv of the mobile networks).
"""
from __future__ import annotations

from collections import OrderedDict

import torchvision
from torch import nn

from finegrained.backbones.base import Backbone, _last_stride2_conv, _stride_one
from finegrained.backbones.weights import load_weights


def _resnet(name: str, weights, last_stride: int) -> Backbone:
    model = torchvision.models.get_model(name, weights=None)
    load_weights(model, name, weights, feature_prefixes=["conv1", "bn1", "layer"])
    if last_stride == 1:
        for m in model.layer4.modules():
            if isinstance(m, nn.Conv2d) and tuple(m.stride) == (2, 2):
                m.stride = (1, 1)
    features = nn.Sequential(OrderedDict(
        (k, getattr(model, k)) for k in ["conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4"]))
    return Backbone(features, model.fc.in_features, name)


def _vgg(name: str, weights, last_stride: int) -> Backbone:
    if last_stride == 1:
        raise ValueError(f"{name} already ends at relu5_3 without pool5 (stride 16); last_stride must be 2")
    model = torchvision.models.get_model(name, weights=None)
    load_weights(model, name, weights, feature_prefixes=["features"])
    return Backbone(model.features[:-1], 512, name)  # drop pool5


def _densenet(name: str, weights, last_stride: int) -> Backbone:
    model = torchvision.models.get_model(name, weights=None)
    load_weights(model, name, weights, feature_prefixes=["features"])
    if last_stride == 1:
        model.features.transition3.pool = nn.Identity()
    # torchvision applies the final ReLU in forward(), not inside `features`.
    return Backbone(nn.Sequential(model.features, nn.ReLU(inplace=True)), model.classifier.in_features, name)


def _mobile(name: str, weights, last_stride: int) -> Backbone:
    model = torchvision.models.get_model(name, weights=None)
    load_weights(model, name, weights, feature_prefixes=["features"])
    if last_stride == 1:
        _stride_one(_last_stride2_conv(model.features))
    return Backbone(model.features, 1280, name)
