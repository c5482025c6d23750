"""Optimisation of a :class:`~finegrained.model.FineGrainedClassifier`: its settings (:class:`OptimSettings`),
parameter groups, optimisers, schedules and the two-stage protocol's pieces, in one place.

* Parts ``backbone``, ``head`` and ``classifier`` each get a parameter group with learning rate
  ``lr * lr_mult[part]``; the fine-tuning protocol of iSQRT-COV (Li et al., CVPR 2018) uses SGD with
  momentum 0.9 and the classifier at ×5 (:data:`DEFAULT_LR_MULT`).
* Schedules: ``constant``, ``step`` (×``lr_gamma`` at each epoch in ``lr_steps``) or ``cosine`` (to 0
  over the run), torch's schedulers stepped once per epoch.
* The pieces of the two-stage protocol of B-CNN, CBP, G²DeNet and HIHCA that
  :class:`finegrained.callbacks.TwoStageFinetuning` puts together: stage 1's schedule (the backbone at learning
  rate 0), its weight decay, the fresh optimiser state of the backbone at stage 2, the zero-valued loss term that
  keeps a frozen backbone in a multi-process fit, and the classifier trained on cached features.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Union

import torch
from torch import Tensor, nn

PARTS = ("backbone", "head", "classifier")
DEFAULT_LR_MULT = {"backbone": 1.0, "head": 1.0, "classifier": 5.0}
OPTIMIZERS = ("sgd", "adamw", "adam")
SCHEDULERS = ("constant", "step", "cosine")


STAGE1_ROUTES = ("frozen", "cached")


@dataclass
class OptimSettings:
    """The optimiser and schedule of a fit (``model.optim`` in recipes).

    Args:
        optimizer: ``"sgd"`` (with ``momentum``), ``"adamw"`` or ``"adam"``.
        lr: base learning rate; each part's is ``lr * lr_mult[part]``.
        momentum: of SGD (the iSQRT-COV protocol: 0.9).
        lr_mult: multipliers for ``backbone``, ``head`` and ``classifier`` (default :data:`DEFAULT_LR_MULT`).
        weight_decay: L2 penalty on all parameters.
        weight_decay_mult: multipliers of ``weight_decay`` per part (e.g. ``{"classifier": 0}``: the B-CNN and
            G²DeNet code decays the backbone only).
        scheduler: ``"constant"``, ``"step"`` (×``lr_gamma`` at each epoch in ``lr_steps``) or ``"cosine"`` (to 0
            over ``trainer.max_epochs``).
    """

    optimizer: str = "sgd"
    lr: float = 1.2e-3
    momentum: float = 0.9
    lr_mult: Optional[Dict[str, float]] = None
    weight_decay: float = 1e-4
    weight_decay_mult: Optional[Dict[str, float]] = None
    scheduler: str = "constant"
    lr_steps: Optional[List[int]] = None
    lr_gamma: float = 0.1

    def __post_init__(self):
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {self.optimizer!r}; known: {', '.join(OPTIMIZERS)}")
        if self.scheduler not in SCHEDULERS:
            raise ValueError(f"unknown scheduler {self.scheduler!r}; known: {', '.join(SCHEDULERS)}")
        for name, mult in (("lr_mult", self.lr_mult), ("weight_decay_mult", self.weight_decay_mult)):
            unknown_parts = set(mult or {}) - set(PARTS)
            if unknown_parts:
                raise ValueError(f"{name} has unknown parts {sorted(unknown_parts)}; known: {sorted(PARTS)}")

    @classmethod
    def of(cls, settings: Union["OptimSettings", Mapping[str, Any], None]) -> "OptimSettings":
        """Settings from themselves, a mapping (a checkpoint's hyper-parameters) or None (the defaults)."""
        if isinstance(settings, cls):
            return settings
        return cls(**dict(settings or {}))

    @property
    def part_lr_mult(self) -> Dict[str, float]:
        return {**DEFAULT_LR_MULT, **(self.lr_mult or {})}


def parameter_groups(parts: Mapping[str, nn.Module], lr: float, lr_mult: Mapping[str, float],
                     weight_decay: float = 0.0, weight_decay_mult: Optional[Mapping[str, float]] = None,
                     parameter_lr_mult: Optional[Mapping[str, Mapping[str, float]]] = None) -> List[Dict[str, Any]]:
    """One group per part, with its own learning rate ``lr * lr_mult[part]`` and weight decay
    ``weight_decay * weight_decay_mult[part]`` (frozen parameters left out).

    ``parameter_lr_mult[part]`` maps parameter-name prefixes of that part to a further multiplier (a head's
    own, e.g. HIHCA's layer scales at ×10); each gets a group named ``part.prefix``.
    """
    groups = []
    for part in PARTS:
        wd = weight_decay * (weight_decay_mult or {}).get(part, 1.0)
        special = dict((parameter_lr_mult or {}).get(part, {}))
        named = [(n, p) for n, p in parts[part].named_parameters() if p.requires_grad]
        for prefix, mult in special.items():
            params = [p for n, p in named if n.startswith(prefix)]
            if params:
                groups.append({"params": params, "lr": lr * lr_mult[part] * mult, "weight_decay": wd,
                               "name": f"{part}.{prefix}"})
        params = [p for n, p in named if not n.startswith(tuple(special))]
        if params:
            groups.append({"params": params, "lr": lr * lr_mult[part], "weight_decay": wd, "name": part})
    return groups


def build_optimizer(groups: List[Dict[str, Any]], settings: OptimSettings) -> torch.optim.Optimizer:
    if settings.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=settings.lr, momentum=settings.momentum, weight_decay=settings.weight_decay)
    if settings.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=settings.lr, weight_decay=settings.weight_decay)
    return torch.optim.Adam(groups, lr=settings.lr, weight_decay=settings.weight_decay)


def build_schedule(optimizer: torch.optim.Optimizer, settings: OptimSettings, epochs: int):
    """torch's scheduler for ``settings.scheduler`` over ``epochs`` epochs, stepped once per epoch (constant: None)."""
    if settings.scheduler == "step":
        return torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=list(settings.lr_steps or []),
                                                    gamma=settings.lr_gamma)
    if settings.scheduler == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, epochs))
    return None


def configure_optimizers(parts: Mapping[str, nn.Module], settings: OptimSettings, max_epochs: Optional[int],
                         parameter_lr_mult: Optional[Mapping[str, Mapping[str, float]]] = None,
                         stage1=None):
    """What ``LightningModule.configure_optimizers`` returns for ``settings``.

    ``stage1`` (a :class:`finegrained.callbacks.TwoStageFinetuning`, or None) holds the first ``frozen_epochs``
    epochs at its own factors (:func:`stage1_schedule`); the schedule then runs over the remaining epochs, its
    milestones counted from the start of stage 2.
    """
    groups = parameter_groups(parts, settings.lr, settings.part_lr_mult, settings.weight_decay,
                              settings.weight_decay_mult, parameter_lr_mult)
    opt = build_optimizer(groups, settings)
    frozen = stage1.frozen_epochs if stage1 is not None else 0
    schedule = build_schedule(opt, settings, (max_epochs or 1) - frozen)
    if frozen:
        schedule = stage1.schedule(opt, schedule)
    if schedule is None:
        return opt
    return {"optimizer": opt, "lr_scheduler": {"scheduler": schedule, "interval": "epoch"}}


def stage1_schedule(optimizer: torch.optim.Optimizer, stage2, epochs: int, lr: float, steps, gamma: float):
    """torch's ``SequentialLR``: for ``epochs`` epochs every group at a constant factor (0 for the backbone, ``lr``
    for head and classifier, ×``gamma`` at each of ``steps``), then ``stage2`` (None: constant)."""
    steps = list(steps or [])
    factors = [0.0 if g["name"] == "backbone" else lr / g["lr"] for g in optimizer.param_groups]
    first = torch.optim.lr_scheduler.LambdaLR(optimizer, [lambda epoch, f=f: f * stage1_decay(epoch, steps, gamma)
                                                          for f in factors])
    constant = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=[])  # a schedule that never changes
    return torch.optim.lr_scheduler.SequentialLR(optimizer, [first, stage2 or constant], milestones=[epochs])


def stage1_decay(epoch: int, steps, gamma: float) -> float:
    """The stage-1 learning-rate factor at ``epoch``: ×``gamma`` at each epoch of ``steps`` (CBP's multistep)."""
    return gamma ** sum(epoch >= step for step in steps)


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


def stage_weight_decay(optimizer: torch.optim.Optimizer, stage1: bool, stage1_weight_decay: float) -> None:
    """Stage 1 trains with its own weight decay (the official two-stage code: 0 or nearly); stage 2 with each
    group's own. The group's own is kept as ``initial_weight_decay``."""
    for group in optimizer.param_groups:
        group.setdefault("initial_weight_decay", group["weight_decay"])
        group["weight_decay"] = stage1_weight_decay if stage1 else group["initial_weight_decay"]


def train_on_cached_features(classifier: nn.Module, features: Tensor, labels: Tensor, loss_fn, epochs: int, lr: float,
                             weight_decay: float, batch_size: int, momentum: float = 0.9, seed: int = 0,
                             device: Optional[torch.device] = None, lr_steps=(), lr_gamma: float = 0.1) -> float:
    """Stage 1 on cached features: SGD on the classifier alone, as the official two-stage code trains its
    logistic regression (B-CNN, G²DeNet, HIHCA: lr 1.0, weight decay 0, batch 256, hundreds of epochs).

    Args:
        classifier: maps (B, D) features to (B, K) logits; trained in place.
        features: (N, D) head outputs of the training images, on the CPU (float16 keeps them small).
        labels: (N,).
    Returns:
        the mean training loss of the last epoch.
    """
    from tqdm import tqdm

    device = device or next(classifier.parameters()).device
    optimizer = torch.optim.SGD(classifier.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    schedule = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=list(lr_steps), gamma=lr_gamma)
    generator = torch.Generator().manual_seed(seed)
    classifier.train()
    last = float("nan")
    for _ in tqdm(range(epochs), desc="stage 1 on cached features", unit="epoch"):
        order, total = torch.randperm(len(labels), generator=generator), 0.0
        for start in range(0, len(labels), batch_size):
            rows = order[start:start + batch_size]
            loss = loss_fn(classifier(features[rows].to(device, torch.float32)), labels[rows].to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += float(loss.detach()) * len(rows)
        last = total / len(labels)
        schedule.step()
    return last
