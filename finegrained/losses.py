"""Training losses of the published protocols: (B, K) scores and (B,) labels -> a scalar.

* ``cross_entropy`` -- softmax log loss (every protocol but LRBP's), with optional label smoothing.
* ``one_vs_all_hinge`` -- LRBP's "bisvm" loss (Kong & Fowlkes, CVPR 2017; their ``my_nnloss.m``): for every
  class k, h_k = max(0, 1 − t_k s_k) with t_k = +1 for the true class and −1 otherwise, summed over classes
  and averaged over the batch; as in that code, losses above 1.5 count with slope 0.1 (a ramp that keeps
  far-off outliers from dominating).
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

RAMP_THRESHOLD, RAMP_SLOPE = 1.5, 0.1


def one_vs_all_hinge(scores: Tensor, labels: Tensor) -> Tensor:
    targets = torch.full_like(scores, -1.0).scatter_(1, labels.unsqueeze(1), 1.0)
    hinge = (1 - targets * scores).clamp_min(0)
    hinge = torch.where(hinge > RAMP_THRESHOLD, RAMP_SLOPE * hinge, hinge)
    return hinge.sum(dim=1).mean()


LOSSES = ("cross_entropy", "one_vs_all_hinge")


def loss_function(name: str, label_smoothing: float = 0.0) -> Callable[[Tensor, Tensor], Tensor]:
    if name == "cross_entropy":
        return lambda scores, labels: F.cross_entropy(scores.float(), labels, label_smoothing=label_smoothing)
    if name == "one_vs_all_hinge":
        return lambda scores, labels: one_vs_all_hinge(scores.float(), labels)
    raise ValueError(f"unknown loss {name!r}; known: {', '.join(LOSSES)}")
