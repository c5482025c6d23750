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


STAGE1_ROUTES = ("frozen", "cached")


def check_settings(optimizer: str, scheduler: str, lr_mult: Optional[Mapping[str, float]], stage1_epochs: int,
                   weight_decay_mult: Optional[Mapping[str, float]] = None, stage1_route: str = "frozen") -> None:
    """Raise ValueError for a setting this module does not know."""
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {optimizer!r}; known: {', '.join(OPTIMIZERS)}")
    if scheduler not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {scheduler!r}; known: {', '.join(SCHEDULERS)}")
    for name, mult in (("lr_mult", lr_mult), ("weight_decay_mult", weight_decay_mult)):
        unknown_parts = set(mult or {}) - set(PARTS)
        if unknown_parts:
            raise ValueError(f"{name} has unknown parts {sorted(unknown_parts)}; known: {sorted(PARTS)}")
    if stage1_epochs < 0:
        raise ValueError(f"stage1_epochs must be >= 0, got {stage1_epochs}")
    if stage1_route not in STAGE1_ROUTES:
        raise ValueError(f"unknown stage1_route {stage1_route!r}; known: {', '.join(STAGE1_ROUTES)}")


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
                         max_epochs: Optional[int], parameter_lr_mult: Optional[Mapping[str, Mapping[str, float]]] = None):
    """What ``LightningModule.configure_optimizers`` returns, for the settings ``hp`` (the model's hparams).

    The two-stage protocol is torch's ``SequentialLR``: stage 1 holds every group at a constant factor
    (0 for the backbone, ``stage1_lr`` for head and classifier), then the schedule runs over the
    remaining epochs, its milestones counted from the start of stage 2.
    """
    groups = parameter_groups(parts, hp["lr"], lr_mult, hp["weight_decay"], hp.get("weight_decay_mult"),
                              parameter_lr_mult)
    opt = build_optimizer(groups, hp)
    stage1 = hp["stage1_epochs"] if hp.get("stage1_route", "frozen") == "frozen" else 0
    schedule = build_schedule(opt, hp, (max_epochs or 1) - stage1)
    if stage1:
        steps, gamma = list(hp.get("stage1_lr_steps") or []), hp.get("stage1_lr_gamma", 0.1)
        factors = [0.0 if g["name"] == "backbone" else hp["stage1_lr"] / g["lr"] for g in groups]
        first = torch.optim.lr_scheduler.LambdaLR(opt, [lambda epoch, f=f: f * stage1_decay(epoch, steps, gamma)
                                                        for f in factors])
        constant = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[])  # a schedule that never changes
        schedule = torch.optim.lr_scheduler.SequentialLR(opt, [first, schedule or constant], milestones=[stage1])
    if schedule is None:
        return opt
    return {"optimizer": opt, "lr_scheduler": {"scheduler": schedule, "interval": "epoch"}}


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
            total += float(loss) * len(rows)
        last = total / len(labels)
        schedule.step()
    return last


def clip_activation_gradients(module: nn.Module, bound: float) -> list:
    """Clamp the derivative of the loss with respect to the output of every layer of ``module`` to
    [−bound, bound] as it flows back (G²DeNet's code clamps the back-propagated derivatives of every layer at
    ±1, ``vl_GlbGaussian_nn.m``); parameter gradients are not clipped. Returns the hook handles."""

    def clamp_output(layer, inputs, output):
        if isinstance(output, Tensor) and output.requires_grad:
            output.register_hook(lambda grad: grad.clamp(-bound, bound))

    return [m.register_forward_hook(clamp_output) for m in module.modules() if not list(m.children())]
