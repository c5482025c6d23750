"""A head's data-dependent initialisation before the first training step: NetVLAD's k-means centres and its
assignment weights (Arandjelović et al., "NetVLAD: CNN architecture for weakly supervised place recognition",
CVPR 2016; ``addLayers.m``), LRBP's PCA projections (Kong & Fowlkes, "Low-rank Bilinear Pooling for Fine-Grained
Classification", CVPR 2017).

The backbone maps (evaluation mode) of ``images`` training images drawn with ``seed`` are computed on the first
process, the head initialised from them, and its state broadcast to every process. Skipped when resuming (the
checkpoint holds the result) and when the model starts from ``init_from``.
"""
from __future__ import annotations

import time

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_info
from pytorch_lightning.utilities.seed import isolate_rng
from torch import Tensor

from finegrained.features import backbone_features


def init_head_from_data(head, features: Tensor, seed: int = 0) -> str:
    """Run ``head``'s data-dependent initialisation on ``features`` (B, C, H, W), timed and logged once.

    The one path for fits and ``finegrained bench-table``."""
    started = time.perf_counter()
    what = head.init_from_features(features, seed=seed)
    message = f"data-dependent initialisation: {what} from {len(features)} images ({time.perf_counter() - started:.1f} s)"
    rank_zero_info(message)
    return message


class DataDependentInit(pl.Callback):
    """Args:
        images: how many training images (with the training transforms) the initialisation reads.
        seed: which images, and their random crops and flips.
    """

    def __init__(self, images: int = 128, seed: int = 0):
        if images < 1:
            raise ValueError(f"data_init images must be >= 1, got {images}")
        self.images, self.seed = int(images), int(seed)
        self.done = False

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.initialise(trainer, pl_module)

    def initialise(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Initialise the head once per fit (other callbacks that need the initialised head call this first)."""
        head = pl_module.network.head
        if self.done or not head.has_data_init:
            return
        self.done = True
        source = trainer.ckpt_path or pl_module.hparams.get("init_from")
        if source:
            rank_zero_info(f"{pl_module.hparams.head}: data-dependent initialisation skipped: the weights come from "
                           f"{source}")
            return
        state = None
        if trainer.is_global_zero:
            with isolate_rng():
                torch.manual_seed(self.seed)  # the training transforms' crops and flips too
                features = backbone_features(pl_module.network.backbone, trainer.train_dataloader, self.images,
                                             self.seed, pl_module.device)
            init_head_from_data(head, features, self.seed)
            state = {k: v.cpu() for k, v in head.state_dict().items()}
        head.load_state_dict(trainer.strategy.broadcast(state, src=0))  # every process starts from rank 0's result

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.done = False  # a later fit with this callback initialises its own model
