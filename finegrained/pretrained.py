"""The authors' ImageNet-trained second-order models as starting points, split into backbone and head.

The official fast-MPN-COV fine-grained numbers (iSQRT-COV: Li, Xie, Wang, Gao, CVPR 2018) come from
fine-tuning the authors' ImageNet-trained iSQRT-COV networks, whose 1×1 reduction and its BatchNorm were
trained on ImageNet together with the head ("obtained by simply finetuning our pre-trained fast
MPN-COV-ResNet model", fast-MPN-COV README), not from a plain ImageNet ResNet with a fresh reduction.

Known state-dict layouts (:data:`LAYOUTS`):

* fast-MPN-COV iSQRT-COV ResNet (``mpncovresnet50-15991845.pth``, ``mpncovresnet101-ade9737a.pth``): a
  torchvision-style trunk (``conv1``, ``bn1``, ``layer1`` … ``layer4``, layer4 with stride 1), then
  ``layer_reduce`` (1×1 conv 2048 → 256, no bias), ``layer_reduce_bn`` (BatchNorm2d(256)) and ``fc``
  (32,896 → 1,000, dropped).
* fast-MPN-COV iSQRT-COV VGG-16 with BatchNorm (``mpncovvgg16_bn``): torchvision's ``features.*`` without
  pool5, ``representation.conv_dr_block.0`` (1×1 conv 512 → 256, no bias), ``representation.conv_dr_block.1``
  (BatchNorm2d(256)) and ``classifier.*`` (dropped).

:func:`split_authors_checkpoint` recognises such a state dict and returns the trunk (for the backbone),
the reduction renamed for the head's ``reduce`` block (conv ``reduce.0``, BatchNorm ``reduce.1``, as
:func:`finegrained.heads.reduction.channel_reduction` builds it) and the names it drops.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Optional, Tuple

from torch import Tensor


@dataclass(frozen=True)
class Layout:
    """How one of the authors' files is organised."""

    name: str
    head_prefixes: Tuple[Tuple[str, str], ...]  # (prefix in the file, prefix in the head)
    required: Tuple[str, ...]  # keys the file must hold (the first identifies the layout)
    dropped_prefixes: Tuple[str, ...]  # the ImageNet classifier


LAYOUTS = (
    Layout("fast-MPN-COV iSQRT-COV ResNet",
           head_prefixes=(("layer_reduce.", "reduce.0."), ("layer_reduce_bn.", "reduce.1.")),
           required=("layer_reduce_bn.running_var", "layer_reduce.weight", "layer_reduce_bn.weight",
                     "layer_reduce_bn.bias", "layer_reduce_bn.running_mean", "conv1.weight", "layer4.0.conv1.weight"),
           dropped_prefixes=("fc.",)),
    Layout("fast-MPN-COV iSQRT-COV VGG-16-BN",
           head_prefixes=(("representation.conv_dr_block.0.", "reduce.0."),
                          ("representation.conv_dr_block.1.", "reduce.1.")),
           required=("representation.conv_dr_block.1.running_var", "representation.conv_dr_block.0.weight",
                     "representation.conv_dr_block.1.weight", "representation.conv_dr_block.1.bias",
                     "representation.conv_dr_block.1.running_mean", "features.0.weight", "features.40.weight"),
           dropped_prefixes=("classifier.",)),
)


@dataclass
class SplitCheckpoint:
    layout: str
    trunk: Dict[str, Tensor]  # for the backbone (the full network's names)
    head: Dict[str, Tensor]  # for the head (its own names)
    dropped: List[str] = field(default_factory=list)


def split_authors_checkpoint(state: Mapping[str, Tensor], source: str = "the weights") -> Optional[SplitCheckpoint]:
    """Split ``state`` if it has one of the authors' layouts; None for any other state dict.

    A ``module.`` prefix (saved from DataParallel) is removed first. A file that has a layout's first
    key but lacks others is an error naming what is missing.
    """
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    for layout in LAYOUTS:
        if layout.required[0] not in state:
            continue
        missing = [k for k in layout.required if k not in state]
        if missing:
            raise ValueError(f"{source} look like a {layout.name} checkpoint ({layout.required[0]}) but lack "
                             f"{missing}; expected the layout described in finegrained/pretrained.py")
        split = SplitCheckpoint(layout.name, {}, {})
        for key, value in state.items():
            renamed = next((new + key[len(old):] for old, new in layout.head_prefixes if key.startswith(old)), None)
            if renamed is not None:
                split.head[renamed] = value
            elif key.startswith(layout.dropped_prefixes):
                split.dropped.append(key)
            else:
                split.trunk[key] = value
        return split
    return None
