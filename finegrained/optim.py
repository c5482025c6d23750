"""Optimisation of a :class:`~finegrained.model.FineGrainedClassifier`: parameter groups, optimisers,
schedules and the two-stage protocol, in one place.

* Parts ``backbone``, ``head`` and ``classifier`` each get a parameter group with learning rate
  ``lr * lr_mult[part]``; the fine-tuning protocol of iSQRT-COV (Li et al., CVPR 2018) uses SGD with
  momentum 0.9 and the classifier at ×5 (:data:`DEFAULT_LR_MULT`).
* Schedules: ``constant``, ``step`` (×``lr_gamma`` at each epoch in ``lr_steps``) or ``cosine`` (to 0
  over the run), torch's schedulers stepped once per epoch.
* The two-stage protocol of B-CNN, CBP, G²DeNet and HIHCA: for ``stage1_epochs`` epochs the backbone is
  frozen (weights and BatchNorm statistics: it runs in evaluation mode and without autograd, at learning
  rate 0) and head and classifier train at ``stage1_lr``; the schedule then runs over the remaining
  epochs, and the backbone joins with a fresh optimiser state. It works on several processes (DDP).
"""
from __future__ import annotations

from typing import Any, Dict, List, Mapping, Optional

import torch
from torch import Tensor, nn

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


def build_optimizer(groups: List[Dict[str, Any]], hp: Mapping[str, Any]) -> torch.optim.Optimizer:
    if hp["optimizer"] == "sgd":
        return torch.optim.SGD(groups, lr=hp["lr"], momentum=hp["momentum"], weight_decay=hp["weight_decay"])
    if hp["optimizer"] == "adamw":
        return torch.optim.AdamW(groups, lr=hp["lr"], weight_decay=hp["weight_decay"])
    return torch.optim.Adam(groups, lr=hp["lr"], weight_decay=hp["weight_decay"])


def build_schedule(optimizer: torch.optim.Optimizer, hp: Mapping[str, Any], epochs: int):
    """torch's scheduler for ``hp["scheduler"]`` over ``epochs`` epochs, stepped once per epoch (constant: None)."""
    if hp["scheduler"] == "step":
        return torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=list(hp["lr_steps"] or []),
                                                    gamma=hp["lr_gamma"])
    if hp["scheduler"] == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, epochs))
    return None


def configure_optimizers(parts: Mapping[str, nn.Module], hp: Mapping[str, Any], lr_mult: Mapping[str, float],
                         max_epochs: Optional[int]):
    """What ``LightningModule.configure_optimizers`` returns, for the settings ``hp`` (the model's hparams).

    The two-stage protocol is torch's ``SequentialLR``: stage 1 holds every group at a constant factor
    (0 for the backbone, ``stage1_lr`` for head and classifier), then the schedule runs over the
    remaining epochs, its milestones counted from the start of stage 2.
    """
    groups = parameter_groups(parts, hp["lr"], lr_mult)
    opt = build_optimizer(groups, hp)
    stage1 = hp["stage1_epochs"]
    schedule = build_schedule(opt, hp, (max_epochs or 1) - stage1)
    if stage1:
        factors = [0.0 if g["name"] == "backbone" else hp["stage1_lr"] / g["lr"] for g in groups]
        first = torch.optim.lr_scheduler.LambdaLR(opt, [lambda epoch, f=f: f for f in factors])
        constant = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[])  # a schedule that never changes
        schedule = torch.optim.lr_scheduler.SequentialLR(opt, [first, schedule or constant], milestones=[stage1])
    if schedule is None:
        return opt
    return {"optimizer": opt, "lr_scheduler": {"scheduler": schedule, "interval": "epoch"}}


def backbone_frozen(epoch: int, stage1_epochs: int) -> bool:
    """Stage 1 of the two-stage protocol: the backbone is frozen (weights and BatchNorm statistics)."""
    return epoch < stage1_epochs


def zero_through(module: nn.Module) -> Tensor:
    """0 × the sum of the trainable parameters of ``module``: a loss term of value 0 that every one of them
    takes part in.

    DistributedDataParallel expects a gradient for every parameter that requires one, so a frozen
    backbone whose forward runs without autograd would stop a multi-process fit ("parameters that were
    not used in producing the loss"). Its gradients are then exactly 0, all-reduced like any other, and
    its learning rate is 0 in stage 1.
    """
    return sum(p.sum() for p in module.parameters() if p.requires_grad) * 0.0


def forget_state(optimizer: torch.optim.Optimizer, module: nn.Module) -> None:
    """Drop the optimiser state (momentum, Adam moments) of the parameters of ``module``.

    At the start of stage 2 the backbone starts afresh, as it would had it joined the optimiser then:
    its zero stage-1 gradients (and weight decay) must not leave momentum behind.
    """
    for p in module.parameters():
        optimizer.state.pop(p, None)
