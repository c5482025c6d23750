"""The contract every pooling head follows.

A head maps backbone features (B, C, H, W) to a representation (B, ``output_dim``). The classifier,
the exporter and the benchmarks use only what :class:`PoolingHead` declares, never ``hasattr``:

==========================  ====================================================================
member                      meaning
==========================  ====================================================================
``output_dim``              size of the representation (the number of classes for a logits head)
``produces_logits``         class attribute: the head computes class scores itself (LRBP); it then
                            takes ``num_classes`` and the classifier after it is the identity
``aux_loss``                an auxiliary loss of the last forward in training mode (GM-SOP's load
                            balance), added to the training loss; ``None`` otherwise
``has_data_init``,          a data-dependent initialisation from backbone features of training
``init_from_features``      images (NetVLAD's k-means centres, LRBP's PCA reduction)
``export_substitute()``,    what the head computes instead of an eigendecomposition while
``use_substitute``          ``use_substitute`` is set (ONNX has no eigensolver); ``None`` when it
                            exports as it is
``parameter_lr_mult``       class attribute: learning-rate multipliers of parameter-name prefixes,
                            relative to the head's rate (HIHCA's layer scales: ×10)
``classifier_init_std``     class attribute: the linear classifier after the head starts from a
                            truncated normal with this std and zero bias (SoT: 0.02); ``None``
                            keeps PyTorch's default
``uses_class_token``        class attribute: the head takes ``class_token_dim`` and, from a
                            backbone with a class token (ViT), receives ``(map, class_token)``
                            instead of the map alone (SoT's fusion)
``paper``                   class attribute: the paper to cite, as the Methods page and model cards
                            give it
==========================  ====================================================================

Heads register under a name with :func:`finegrained.heads.register_head`; that registry also holds
their display names (the papers' spelling, e.g. ``"iSQRT-COV"``).
"""
from __future__ import annotations

from typing import ClassVar, Dict, Optional

import torch
from torch import Tensor, nn


def local_descriptors(features: Tensor, max_rows: Optional[int] = None, seed: int = 0) -> Tensor:
    """(B, C, H, W) feature maps or (N, C) rows -> (N, C) rows, one per position, for data-dependent
    initialisations; at most ``max_rows`` of them, drawn without replacement with ``seed``."""
    if features.dim() == 4:
        features = features.flatten(2).transpose(1, 2).reshape(-1, features.shape[1])
    if features.dim() != 2:
        raise ValueError(f"expected (B, C, H, W) feature maps or (N, C) descriptors, got {tuple(features.shape)}")
    if max_rows and len(features) > max_rows:
        rows = torch.randperm(len(features), generator=torch.Generator().manual_seed(seed))[:max_rows]
        features = features[rows]
    return features


class PoolingHead(nn.Module):
    """Base class of every head: (B, C, H, W) -> (B, ``output_dim``)."""

    produces_logits: ClassVar[bool] = False
    uses_class_token: ClassVar[bool] = False
    classifier_init_std: ClassVar[Optional[float]] = None
    parameter_lr_mult: ClassVar[Dict[str, float]] = {}
    paper: ClassVar[str] = ""

    def __init__(self) -> None:
        super().__init__()
        self.output_dim: int = 0
        self.aux_loss: Optional[Tensor] = None
        self.use_substitute: bool = False

    @property
    def has_data_init(self) -> bool:
        """Whether the head has a data-dependent initialisation (it overrides :meth:`init_from_features`)."""
        return type(self).init_from_features is not PoolingHead.init_from_features

    def init_from_features(self, features: Tensor, seed: int = 0) -> str:
        """Initialise from backbone features (B, C, H, W) of training images; returns what was done, in one line."""
        raise NotImplementedError(f"{type(self).__name__} has no data-dependent initialisation")

    def export_substitute(self) -> Optional[str]:
        """One line on the eigendecomposition-free computation used while ``use_substitute`` is set, or None."""
        return None
