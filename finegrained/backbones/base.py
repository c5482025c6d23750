"""What every backbone is: a feature extractor with a known number of output channels.

:class:`Backbone` maps images (B, 3, H, W) to features (B, C, H/s, W/s) with ``out_channels = C``;
the helpers here remove a network's last down-sampling (``last_stride=1``), so that a 448 input
gives a 28×28 map as in the published iSQRT-COV fine-tuning.
"""
from __future__ import annotations

from typing import Dict, List, Sequence, Union

from torch import Tensor, nn


class Backbone(nn.Module):
    """A feature extractor with a known number of output channels.

    Attributes:
        features: the network cut at its last conv map; (B, 3, H, W) -> (B, C, h, w), or a list of such
            maps when the backbone returns several layers (:class:`LayerOutputs`).
        out_channels: C, or one C per returned layer.
        name: the builder name, e.g. ``"resnet50"``.
        class_token_dim: D of the class token the backbone can return with its map (ViT-like timm models);
            0 when it has none.
        return_class_token: while set, the backbone returns ``(map, class_token)`` with (B, D); set by the
            model for heads that use the class token (SoT), so every other head sees the map alone.
    """

    class_token_dim: int = 0

    def __init__(self, features: nn.Module, out_channels: Union[int, List[int]], name: str):
        super().__init__()
        self.features = features
        self.out_channels = out_channels
        self.name = name

    @property
    def return_class_token(self) -> bool:
        return False

    @return_class_token.setter
    def return_class_token(self, value: bool) -> None:
        if value:
            raise ValueError(f"{self.name} has no class token")

    def forward(self, x: Tensor) -> Tensor:
        return self.features(x)


class LayerOutputs(nn.Module):
    """A sequential network that returns the outputs of several of its layers, e.g. VGG's relu5_2 and relu5_3
    (the two layers HIHCA fuses); it stops after the last one asked for.

    (B, 3, H, W) -> [(B, C_i, h_i, w_i) for each layer, in network order].
    """

    def __init__(self, layers: nn.Sequential, returned: Sequence[int]):
        super().__init__()
        self.returned = sorted(returned)
        self.layers = layers[:self.returned[-1] + 1]

    def forward(self, x: Tensor) -> List[Tensor]:
        outputs = []
        for index, layer in enumerate(self.layers):
            x = layer(x)
            if index in self.returned:
                outputs.append(x)
        return outputs


def vgg_layer_names(features: nn.Sequential) -> Dict[str, int]:
    """{"conv5_3": 28, "relu5_3": 29, ...}: the names of the VGG papers for the indices of ``features``."""
    names, block, number = {}, 1, 0
    for index, layer in enumerate(features):
        if isinstance(layer, nn.Conv2d):
            number += 1
            names[f"conv{block}_{number}"] = index
        elif isinstance(layer, nn.ReLU):
            names[f"relu{block}_{number}"] = index
        elif isinstance(layer, nn.MaxPool2d):
            names[f"pool{block}"] = index
            block, number = block + 1, 0
    return names


def stride2_convs(module: nn.Module) -> List[nn.Conv2d]:
    """The stride-2 convolutions of ``module``, in definition order."""
    return [m for m in module.modules() if isinstance(m, nn.Conv2d) and tuple(m.stride) == (2, 2)]


def last_stride2_conv(module: nn.Module) -> nn.Conv2d:
    convs = stride2_convs(module)
    if not convs:
        raise ValueError("no stride-2 convolution to remove")
    return convs[-1]


def remove_stride(conv: nn.Conv2d) -> None:
    """Make a stride-2 convolution stride 1 (its map, and every map after it, doubles in size)."""
    conv.stride = (1, 1)
    if hasattr(conv, "static_padding"):  # TF "SAME" padding precomputed for stride 2
        k = conv.kernel_size[0]
        conv.static_padding = nn.ZeroPad2d(k // 2)
