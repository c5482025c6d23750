"""Features of a :class:`~finegrained.network.FineGrainedNetwork` over a data loader, in evaluation mode.

* :func:`head_features`: (N, D) head outputs (or (N, 2, D) with each image's horizontal flip) and (N,) labels,
  float16 on the CPU: what the cached first stage of the two-stage protocols (B-CNN, G²DeNet, HIHCA) and the SVM
  test train on.
* :func:`backbone_features`: (n, C, h, w) backbone maps of ``n`` training images drawn with a seed: what a head's
  data-dependent initialisation (NetVLAD's k-means, LRBP's PCA) reads.
"""
from __future__ import annotations

from typing import Tuple

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Subset

from finegrained.network import InferenceNetwork


@torch.no_grad()
def head_features(network: nn.Module, loader, device, flip: bool = False) -> Tuple[Tensor, Tensor]:
    """Head outputs (float16, on the CPU) and (N,) labels of every batch of ``loader``, the network in evaluation
    mode: (N, D), or with ``flip`` (N, 2, D) for each image and its horizontal flip."""
    from tqdm import tqdm

    was_training = network.training
    network.eval()
    features, labels = [], []
    protocol = InferenceNetwork(network, flip)  # the test protocol's own views of each batch
    try:
        for images, targets in tqdm(loader, desc="head features", unit="batch"):
            images = images.to(device)
            views = protocol.views(images)
            rows = [network.forward_features(view).float().to("cpu", torch.float16) for view in views]
            features.append(torch.stack(rows, dim=1) if flip else rows[0])
            labels.append(torch.as_tensor(targets).cpu())
    finally:
        network.train(was_training)
    return torch.cat(features), torch.cat(labels)


@torch.no_grad()
def backbone_features(backbone: nn.Module, loader: DataLoader, images: int, seed: int, device) -> Tensor:
    """Backbone maps (evaluation mode, on the CPU) of ``images`` images of ``loader``'s dataset drawn with ``seed``.
    The dataset's own transforms draw from the global random state: the caller seeds (and restores) it."""
    dataset = loader.dataset
    chosen = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[:images].tolist()
    subset = DataLoader(Subset(dataset, chosen), batch_size=loader.batch_size, num_workers=loader.num_workers,
                        collate_fn=loader.collate_fn)
    was_training = backbone.training
    backbone.eval()
    features = []
    try:
        for batch in subset:
            features.append(backbone(batch[0].to(device)).float().cpu())
    finally:
        backbone.train(was_training)
    return torch.cat(features)
