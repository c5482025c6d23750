"""Optimisation of a :class:`~finegrained.model.FineGrainedClassifier`: parameter groups, optimisers,
schedules and the two-stage protocol, in one place.

* Parts ``backbone``, ``head`` and ``classifier`` each get a parameter group with learning rate
  ``lr * lr_mult[part]``; the fine-tuning protocol of iSQRT-COV (Li et al., CVPR 2018) uses SGD with
  momentum 0.9 and the classifier at ×5 (:data:`DEFAULT_LR_MULT`).
* Schedules: ``constant``, ``step`` (×``lr_gamma`` at each epoch in ``lr_steps``) or ``cosine`` (to 0
  over the run), stepped once per epoch.
* The two-stage protocol of B-CNN, CBP, G²DeNet and HIHCA: for ``stage1_epochs`` epochs the backbone is
  frozen (weights and BatchNorm statistics) and head and classifier train at ``stage1_lr``; the
  schedule then runs over the remaining epochs.
"""
from __future__ import annotations

import functools
import math
from typing import Any, Dict, List, Mapping, Optional

import torch
from torch import nn

PARTS = ("backbone", "head", "classifier")
DEFAULT_LR_MULT = {"backbone": 1.0, "head": 1.0, "classifier": 5.0}
OPTIMIZERS = ("sgd", "adamw", "adam")
SCHEDULERS = ("constant", "step", "cosine")


def check_settings(optimizer: str, scheduler: str, lr_mult: Optional[Mapping[str, float]], stage1_epochs: int) -> None:
    """Raise ValueError for a setting this module does not know."""
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {optimizer!r}; known: {', '.join(OPTIMIZERS)}")
    if scheduler not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {scheduler!r}; known: {', '.join(SCHEDULERS)}")
    unknown_parts = set(lr_mult or {}) - set(DEFAULT_LR_MULT)
    if unknown_parts:
        raise ValueError(f"lr_mult has unknown parts {sorted(unknown_parts)}; known: {sorted(DEFAULT_LR_MULT)}")
    if stage1_epochs < 0:
        raise ValueError(f"stage1_epochs must be >= 0, got {stage1_epochs}")


def parameter_groups(parts: Mapping[str, nn.Module], lr: float, lr_mult: Mapping[str, float]) -> List[Dict[str, Any]]:
    """One group per part, each with its own learning rate (frozen parameters left out)."""
    groups = []
    for part in PARTS:
        params = [p for p in parts[part].parameters() if p.requires_grad]
        if params:
            groups.append({"params": params, "lr": lr * lr_mult[part], "name": part})
    return groups


def configure_optimizers(parts: Mapping[str, nn.Module], hp: Mapping[str, Any], lr_mult: Mapping[str, float],
                         max_epochs: Optional[int]):
    """What ``LightningModule.configure_optimizers`` returns, for the settings ``hp`` (the model's hparams)."""
    groups = parameter_groups(parts, hp["lr"], lr_mult)
    if hp["optimizer"] == "sgd":
        opt = torch.optim.SGD(groups, lr=hp["lr"], momentum=hp["momentum"], weight_decay=hp["weight_decay"])
    elif hp["optimizer"] == "adamw":
        opt = torch.optim.AdamW(groups, lr=hp["lr"], weight_decay=hp["weight_decay"])
    else:
        opt = torch.optim.Adam(groups, lr=hp["lr"], weight_decay=hp["weight_decay"])
    if hp["stage1_epochs"]:
        factors = [functools.partial(lr_factor, part=g["name"], hp=hp, lr_mult=lr_mult, max_epochs=max_epochs)
                   for g in groups]
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda=factors)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "epoch"}}
    if hp["scheduler"] == "constant":
        return opt
    if hp["scheduler"] == "step":
        sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=list(hp["lr_steps"] or []), gamma=hp["lr_gamma"])
    else:
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, max_epochs or 1))
    return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "epoch"}}


def lr_factor(epoch: int, part: str, hp: Mapping[str, Any], lr_mult: Mapping[str, float],
              max_epochs: Optional[int]) -> float:
    """Multiplier of a part's learning rate at ``epoch`` under the two-stage protocol."""
    if epoch < hp["stage1_epochs"]:
        return 0.0 if part == "backbone" else hp["stage1_lr"] / (hp["lr"] * lr_mult[part])
    epoch -= hp["stage1_epochs"]
    if hp["scheduler"] == "step":
        return hp["lr_gamma"] ** sum(epoch >= step for step in (hp["lr_steps"] or []))
    if hp["scheduler"] == "cosine":
        remaining = max(1, (max_epochs or 1) - hp["stage1_epochs"])
        return 0.5 * (1 + math.cos(math.pi * min(epoch, remaining) / remaining))
    return 1.0


def set_stage(backbone: nn.Module, epoch: int, stage1_epochs: int) -> None:
    """At the start of an epoch: freeze the backbone during stage 1 of the two-stage protocol."""
    in_stage1 = epoch < stage1_epochs
    if stage1_epochs:
        backbone.requires_grad_(not in_stage1)
        if in_stage1:
            backbone.eval()  # frozen features: BN statistics stay the pretrained ones
