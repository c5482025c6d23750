"""FineGrainedNetwork: backbone -> second-order head -> linear classifier, as a plain ``nn.Module``.

The network of every method here (iSQRT-COV: Li, Xie, Wang, Gao, "Towards Faster Training of Global Covariance
Pooling Networks by Iterative Matrix Square Root Normalization", CVPR 2018; the other heads in
:mod:`finegrained.heads`), without Lightning, for any training loop, as a timm model:

    >>> net = FineGrainedNetwork(200, backbone="resnet50", backbone_weights=None, head="isqrt")
    >>> net(torch.randn(2, 3, 224, 224)).shape
    torch.Size([2, 200])

Shapes: images (B, 3, H, W) -> backbone maps (B, C, h, w) -> :meth:`forward_features` (B, head.output_dim)
-> :meth:`forward_head` (B, num_classes). A head with ``produces_logits`` (low-rank bilinear pooling) is its own
classifier; a head that sets ``aux_loss`` in training (GM-SOP's load balance) leaves it on the head for the loss.

Weights (ImageNet, a file, the authors' second-order models, ``init_from``) come through
:mod:`finegrained.network_weights`. :class:`InferenceNetwork` adds the test protocol (the mean of the logits of
each image and its horizontal flip); it is what ``finegrained test`` evaluates and what export writes.

Sharing: ``save_pretrained(folder)``, ``FineGrainedNetwork.from_pretrained(folder_or_repo_id)`` and
``push_to_hub(repo_id)`` come from huggingface_hub's ``PyTorchModelHubMixin``; :mod:`finegrained.network_hub` says what
the folder holds (config.json, model.safetensors, a model card) and loads it strictly, without pickle.
"""
from __future__ import annotations

import os
from typing import Any, Dict, List, Optional, Sequence, Union

import torch
from huggingface_hub import PyTorchModelHubMixin
from torch import Tensor, nn

from finegrained.backbones import build_backbone
from finegrained.heads import build_head
from finegrained.network_weights import authors_checkpoint, load_authors_head, load_matching_weights


class FineGrainedNetwork(nn.Module, PyTorchModelHubMixin, library_name="finegrained", license="mit",
                         pipeline_tag="image-classification", tags=["fine-grained-classification"]):
    """Backbone -> pooling head -> linear classifier.

    Args:
        num_classes: number of outputs.
        backbone: a name from :func:`finegrained.backbones.available_backbones`, ``"timm/<model name>"`` for any
            timm model (ConvNeXt, ViT, Swin, EVA, ...), or an ``nn.Module`` mapping images to (B, C, h, w) with an
            integer ``out_channels`` (then with its own weights: ``backbone_weights`` must be None).
        backbone_weights: ``None``, ``"imagenet"`` or a path to a state dict (timm backbones: also a timm
            pretrained tag, and ``.safetensors`` files): of the full backbone network, or one of the authors'
            ImageNet-trained second-order models (:mod:`finegrained.pretrained`), whose trunk goes into the
            backbone and whose 1×1 reduction and BatchNorm go into the head; what was mapped is logged.
        last_stride: 1 removes the backbone's last down-sampling.
        head: a name from :func:`finegrained.heads.available_heads`.
        head_kwargs: keyword arguments of the head (e.g. ``{"reduction": 256}``).
        dropout: dropout before the classifier.
        backbone_layers: backbone layers whose maps the head receives together (HIHCA: ``["relu5_2", "relu5_3"]``).
        channels_last: keep the backbone's convolution weights in channels-last memory format (values unchanged).
        init_from: a checkpoint of ``finegrained fit`` to start from: tensors whose names and shapes match are
            copied, the others (a classifier for another number of classes) stay at their initialisation;
            the names dropped are kept in ``dropped_from_init``.

    ``architecture`` holds the arguments that rebuild the network (what ``save_pretrained`` writes to config.json);
    ``pretrained_cfg`` what its outputs mean and how its inputs are made (``class_names``, ``preprocessing``,
    ``test_flip``: set by ``finegrained export --format hf`` and read back by ``from_pretrained``).
    """

    def __init__(self, num_classes: int, backbone: Union[str, nn.Module] = "resnet50",
                 backbone_weights: Optional[str] = "imagenet", last_stride: int = 2, head: str = "isqrt",
                 head_kwargs: Optional[Dict[str, Any]] = None, dropout: float = 0.0,
                 backbone_layers: Optional[Sequence[str]] = None, channels_last: bool = False,
                 init_from: Optional[str] = None):
        super().__init__()
        authors = authors_checkpoint(backbone, backbone_weights)
        self.backbone = build_backbone(backbone, weights=authors.trunk if authors else backbone_weights,
                                       last_stride=last_stride, layers=backbone_layers)
        self.head = build_head(head, self.backbone.out_channels, num_classes=num_classes,
                               class_token_dim=self.backbone.class_token_dim, **(head_kwargs or {}))
        # The class token reaches the heads that use it (SoT) and no other.
        self.backbone.return_class_token = self.head.uses_class_token and self.backbone.class_token_dim > 0
        if authors:
            load_authors_head(self.head, authors, str(backbone_weights), head, head_kwargs, last_stride)
        self.num_classes = int(num_classes)
        self.dropout = float(dropout)
        self.classifier = self._new_classifier(self.num_classes)
        self.channels_last = bool(channels_last)
        if channels_last:
            self.backbone.to(memory_format=torch.channels_last)
        self.dropped_from_init: List[str] = load_matching_weights(self, init_from) if init_from else []
        self.architecture: Dict[str, Any] = {
            "num_classes": self.num_classes, "backbone": backbone if isinstance(backbone, str) else None,
            "last_stride": int(last_stride), "head": head, "head_kwargs": dict(head_kwargs or {}),
            "dropout": self.dropout, "backbone_layers": list(backbone_layers) if backbone_layers else None,
            "channels_last": self.channels_last}
        self.pretrained_cfg: Dict[str, Any] = {}

    def _new_classifier(self, num_classes: int) -> nn.Module:
        if self.head.produces_logits or num_classes == 0:  # 0: no classifier, the features are the output (timm)
            return nn.Identity()
        linear = nn.Linear(self.head.output_dim, num_classes)
        if self.head.classifier_init_std is not None:
            nn.init.trunc_normal_(linear.weight, std=self.head.classifier_init_std)
            nn.init.zeros_(linear.bias)
        return nn.Sequential(nn.Dropout(self.dropout) if self.dropout else nn.Identity(), linear)

    @property
    def num_features(self) -> int:
        """The dimension of :meth:`forward_features` (timm's name)."""
        return self.head.output_dim

    def in_memory_format(self, images: Tensor) -> Tensor:
        """``images`` in channels-last format when the network keeps it (a no-op otherwise)."""
        if self.channels_last and images.dim() == 4:
            return images.contiguous(memory_format=torch.channels_last)
        return images

    def forward_features(self, images: Tensor) -> Tensor:
        """(B, 3, H, W) images -> (B, head.output_dim) head features (class scores for a ``produces_logits`` head)."""
        return self.head(self.backbone(self.in_memory_format(images)))

    def forward_head(self, features: Tensor, pre_logits: bool = False) -> Tensor:
        """(B, head.output_dim) -> (B, num_classes) logits; with ``pre_logits`` the features as they are."""
        return features if pre_logits else self.classifier(features)

    def get_classifier(self) -> nn.Module:
        """The classifier module (timm's name); an identity for a head that computes class scores itself."""
        return self.classifier

    def forward(self, images: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(images))

    def inference_network(self, test_flip: Optional[bool] = None) -> "InferenceNetwork":
        """This network as ``finegrained test`` evaluates it: with ``test_flip`` (default: ``pretrained_cfg``'s,
        else off) the mean of the logits of each image and its horizontal flip."""
        flip = self.pretrained_cfg.get("test_flip", False) if test_flip is None else test_flip
        return InferenceNetwork(self, flip)

    # -- huggingface_hub's PyTorchModelHubMixin: what save_pretrained writes and from_pretrained reads ----------
    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args: Any, **kwargs: Any) -> "FineGrainedNetwork":
        """The network of a folder written by ``save_pretrained`` (or ``finegrained export --format hf``), or of a
        Hub repository id (``"user/name"``), in evaluation mode; weights from ``model.safetensors`` only, checked
        to be exactly the network's. A local path (one that exists, or is written as a path) is checked first,
        so that a mistyped folder is one clear error rather than a Hub lookup."""
        from finegrained.network_hub import read_local_config

        name = os.path.expanduser(os.fspath(pretrained_model_name_or_path))
        if (os.path.isdir(name) or os.path.isabs(name) or name.startswith(".") or name.endswith(("/", os.sep))
                or name.count("/") > 1):
            read_local_config(name)
        return super().from_pretrained(name, *args, **kwargs)

    def _save_pretrained(self, save_directory) -> None:
        from finegrained.network_hub import save_network

        save_network(self, save_directory)

    @classmethod
    def _from_pretrained(cls, *, model_id: str, revision: Optional[str], cache_dir, force_download: bool,
                         local_files_only: bool, token, config: Optional[Dict[str, Any]] = None,
                         map_location: str = "cpu", **ignored) -> "FineGrainedNetwork":
        from finegrained.network_hub import load_network

        return load_network(cls, model_id, config, map_location=map_location, revision=revision,
                            cache_dir=cache_dir, force_download=force_download, local_files_only=local_files_only,
                            token=token)

    def reset_classifier(self, num_classes: int) -> None:
        """A new classifier for ``num_classes`` outputs, initialised as at construction (fine-tuning on other
        classes); 0 removes it, so the network returns its features (as timm's). A head that computes class scores
        itself (LRBP) has no separate classifier to reset."""
        if self.head.produces_logits:
            raise ValueError(f"{type(self.head).__name__} computes class scores itself; build a new network "
                             f"for {num_classes} classes (init_from keeps the matching tensors)")
        self.num_classes = int(num_classes)
        self.architecture["num_classes"] = self.num_classes
        self.pretrained_cfg.pop("class_names", None)  # they named the outputs of the classifier replaced here
        device = next(self.parameters()).device
        self.classifier = self._new_classifier(self.num_classes).to(device)


class InferenceNetwork(nn.Module):
    """images (B, 3, h, w) -> logits (B, K) as evaluated: with ``test_flip``, the mean of the logits of each
    image and its horizontal flip (the iSQRT-COV test protocol). Plain modules only, so it exports."""

    def __init__(self, network: FineGrainedNetwork, test_flip: bool):
        super().__init__()
        self.network, self.test_flip = network, bool(test_flip)

    def views(self, images: Tensor) -> List[Tensor]:
        """The inputs whose logits are averaged: the images, and their flip with ``test_flip``."""
        return [images, torch.flip(images, dims=[3])] if self.test_flip else [images]

    @staticmethod
    def average(logits: List[Tensor]) -> Tensor:
        return torch.stack(logits).mean(dim=0)

    def forward(self, images: Tensor) -> Tensor:
        return self.average([self.network(view) for view in self.views(images)])
