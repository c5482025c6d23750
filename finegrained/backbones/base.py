"""What every backbone is: a feature extractor with a known number of output channels.

:class:`Backbone` maps images (B, 3, H, W) to features (B, C, H/s, W/s) with ``out_channels = C``;
the helpers here remove a network's last down-sampling (``last_stride=1``), so that a 448 input
gives a 28×28 map as in the published iSQRT-COV fine-tuning.
"""
from __future__ import annotations

from typing import List

from torch import Tensor, nn


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
