"""The two-stage fine-tuning of B-CNN (Lin, RoyChowdhury, Maji, ICCV 2015), compact bilinear pooling (Gao et al.,
CVPR 2016), G²DeNet (Wang, Li, Zhang, CVPR 2017) and HIHCA (Cai, Zuo, Zhang, ICCV 2017), as a Lightning
``BaseFinetuning`` callback: first the classifier (and the head) alone on the frozen backbone, then every layer.

Routes:

* ``frozen``: the first ``epochs`` epochs of the fit run with the backbone frozen (weights and BatchNorm
  statistics: evaluation mode, no autograd, learning rate 0) at ``lr`` (×``lr_gamma`` at each of ``lr_steps``,
  compact bilinear pooling's multistep) with weight decay ``weight_decay``; the model's schedule then runs over the
  remaining epochs and the backbone starts with a fresh optimiser state. The backbone stays in the optimiser
  throughout, with a zero gradient in stage 1 (:func:`finegrained.optim.zero_through`), so a multi-process (DDP)
  fit synchronises it once it trains: ``BaseFinetuning``'s usual ``requires_grad`` switch and new parameter group
  would leave it out of DDP's reducer, built when the fit starts.
* ``cached``: before the fit, the head features of the training images (evaluation transform: the official code
  caches un-augmented features) are extracted once on the first process and the classifier alone trains on them
  for ``epochs`` epochs (SGD, batch ``batch_size``, :func:`finegrained.optim.train_on_cached_features`); every
  process receives the result, and every epoch of the fit is stage 2.

``init_std``/``init_bias``: the classifier starts from N(0, std²) weights and this bias (compact bilinear pooling:
1e-4 and 0; G²DeNet: 0.001 and 0.1). Resuming skips everything stage 1 did before the checkpoint.
"""
from __future__ import annotations

import time
from typing import List, Optional

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import BaseFinetuning
from pytorch_lightning.utilities import rank_zero_info, rank_zero_warn
from torch import nn

from finegrained.callbacks.data_init import DataDependentInit
from finegrained.data_contract import follows_contract
from finegrained.features import head_features
from finegrained.optim import (STAGE1_ROUTES, backbone_frozen, forget_state, stage1_schedule, stage_weight_decay,
                               train_on_cached_features)


class TwoStageFinetuning(BaseFinetuning):
    """Args:
        epochs: of stage 1 (0: off).
        route: ``"frozen"`` or ``"cached"`` (above).
        lr, weight_decay, batch_size: of stage 1 (``batch_size``: cached route).
        lr_steps, lr_gamma: stage 1's learning rate is ×gamma at each of these epochs.
        init_std, init_bias: when ``init_std`` is set, the classifier starts stage 1 from N(0, init_std²) weights
            and ``init_bias``.
        seed: of the classifier's initialisation and of the cached route's shuffling.
    """

    def __init__(self, epochs: int = 0, route: str = "frozen", lr: float = 1.0, weight_decay: float = 0.0,
                 batch_size: int = 256, lr_steps: Optional[List[int]] = None, lr_gamma: float = 0.1,
                 init_std: Optional[float] = None, init_bias: float = 0.0, seed: int = 0):
        super().__init__()
        if epochs < 0:
            raise ValueError(f"stage1 epochs must be >= 0, got {epochs}")
        if route not in STAGE1_ROUTES:
            raise ValueError(f"stage1 route must be one of {', '.join(STAGE1_ROUTES)}, got {route!r}")
        if batch_size < 1:
            raise ValueError(f"stage1 batch_size must be >= 1, got {batch_size}")
        for name, value in (("lr", lr), ("weight_decay", weight_decay)):
            if not value >= 0:  # NaN too
                raise ValueError(f"stage1 {name} must be >= 0, got {value}")
        self.epochs, self.route, self.lr, self.weight_decay = int(epochs), route, float(lr), float(weight_decay)
        self.batch_size, self.lr_steps, self.lr_gamma = int(batch_size), list(lr_steps or []), float(lr_gamma)
        self.init_std, self.init_bias, self.seed = init_std, float(init_bias), int(seed)

    @property
    def frozen_epochs(self) -> int:
        """Epochs of the fit that run with the backbone frozen (the frozen route's stage 1)."""
        return self.epochs if self.route == "frozen" else 0

    # -- BaseFinetuning ---------------------------------------------------------------------------------
    def freeze_before_training(self, pl_module: pl.LightningModule) -> None:
        pass  # the backbone stays trainable for DDP (above); each epoch's start decides (finetune_function)

    def finetune_function(self, pl_module: pl.LightningModule, epoch: int, optimizer: torch.optim.Optimizer) -> None:
        if not self.frozen_epochs:
            return
        frozen = backbone_frozen(epoch, self.frozen_epochs)
        pl_module.freeze_backbone(frozen)
        stage_weight_decay(optimizer, frozen, self.weight_decay)
        if epoch == self.frozen_epochs:
            forget_state(optimizer, pl_module.network.backbone)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage == "fit" and self.frozen_epochs and trainer.max_epochs is not None \
                and self.frozen_epochs >= trainer.max_epochs:
            rank_zero_warn(f"stage1 epochs ({self.frozen_epochs}) >= trainer.max_epochs ({trainer.max_epochs}): the "
                           f"backbone is frozen for the whole fit (the frozen route's stage 1 counts in max_epochs)")

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # BaseFinetuning restores the parameter groups it recorded at the first epoch when resuming; here the
        # optimiser never gains groups, and the restored learning rates would be those of epoch 0.
        self._restarting = False

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        pl_module.freeze_backbone(False)

    # -- the schedule -------------------------------------------------------------------------------------
    def schedule(self, optimizer: torch.optim.Optimizer, stage2):
        """The fit's schedule: stage 1's factors for ``frozen_epochs`` epochs, then ``stage2`` (None: constant)."""
        if not self.frozen_epochs:
            return stage2
        return stage1_schedule(optimizer, stage2, self.frozen_epochs, self.lr, self.lr_steps, self.lr_gamma)

    # -- before the first step ----------------------------------------------------------------------------
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.epochs:
            return
        if trainer.ckpt_path:
            if self.route == "cached":
                rank_zero_info(f"stage 1 (cached features) skipped: resuming from {trainer.ckpt_path}")
            return
        # The head must be initialised from data before its features are cached.
        for callback in trainer.callbacks:
            if isinstance(callback, DataDependentInit):
                callback.initialise(trainer, pl_module)
        if self.init_std is not None:
            self._initialise_classifier(pl_module.network.classifier)
        if self.route == "cached":
            self._cached_stage1(trainer, pl_module)

    @torch.no_grad()
    def _initialise_classifier(self, classifier: nn.Module) -> None:
        """The same weights on every process (a seeded generator)."""
        linear = [m for m in classifier.modules() if isinstance(m, nn.Linear)][-1]
        generator = torch.Generator().manual_seed(self.seed)
        linear.weight.copy_(torch.randn(linear.weight.shape, generator=generator) * self.init_std)
        linear.bias.fill_(self.init_bias)

    def _cached_stage1(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        network = pl_module.network
        if network.head.produces_logits:
            raise ValueError(f"stage1 route 'cached' trains a classifier on head features, but "
                             f"{pl_module.hparams.head} computes class scores itself; use route 'frozen' or epochs 0")
        state = None
        if trainer.is_global_zero:
            started = time.perf_counter()
            features, labels = head_features(network, self._unaugmented_training_loader(trainer), pl_module.device)
            loss = train_on_cached_features(network.classifier, features, labels, pl_module.loss_fn, self.epochs,
                                            self.lr, self.weight_decay, self.batch_size, pl_module.optim.momentum,
                                            self.seed, pl_module.device, self.lr_steps, self.lr_gamma)
            rank_zero_info(f"stage 1 on cached features: {len(labels)} images, {features.shape[1]:,}-d, "
                           f"{self.epochs} epochs at lr {self.lr:g} (weight decay {self.weight_decay:g}, "
                           f"batch {self.batch_size}): last loss {loss:.4f} ({time.perf_counter() - started:.0f} s)")
            state = {k: v.cpu() for k, v in network.classifier.state_dict().items()}
        network.classifier.load_state_dict(trainer.strategy.broadcast(state, src=0))

    @staticmethod
    def _unaugmented_training_loader(trainer: pl.Trainer):
        """The training images with the evaluation transform (the official code caches un-augmented features);
        the training loader itself for a DataModule outside the contract (said once)."""
        if follows_contract(trainer.datamodule):
            return trainer.datamodule.unaugmented_train_dataloader()
        rank_zero_info("stage 1 (cached features): the DataModule has no unaugmented_train_dataloader(); "
                       "caching features of the augmented training loader")
        return trainer.train_dataloader
