"""Layers shared by several heads: the 1×1 channel reduction in front of a pooling.

Shapes: (B, C, H, W) -> (B, out_channels, H, W).
"""
from torch import nn


def channel_reduction(in_channels: int, out_channels: int, batch_norm: bool = True) -> nn.Sequential:
    """1×1 conv (no bias) [+ BN] + ReLU, Kaiming fan_out init as in the official iSQRT-COV code.

    MPN-COV and iSQRT-COV use the BN form; GM-SOP's SR-SOP components use conv + ReLU only, also without a bias
    (``Conv_nobn`` with ``bias = false`` in the official ``examples/GM/cnn_init_resnet_GM.m``).
    """
    conv = nn.Conv2d(in_channels, out_channels, kernel_size=1, bias=False)
    nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
    layers = [conv, nn.BatchNorm2d(out_channels)] if batch_norm else [conv]
    return nn.Sequential(*layers, nn.ReLU(inplace=True))


def optional_reduction(in_channels: int, reduction):
    """(module, channels after it): the BN reduction to ``reduction`` channels, or identity for ``None``."""
    if reduction:
        return channel_reduction(in_channels, reduction), reduction
    return nn.Identity(), in_channels
