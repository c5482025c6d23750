"""The SVM test of B-CNN (Lin, RoyChowdhury, Maji, "Bilinear CNN Models for Fine-grained Visual Recognition",
ICCV 2015; its MatConvNet code) and HIHCA: after the test, one-vs-all linear SVMs (C = 1) on l2-normalised head
features of the un-augmented training images and their flips (:mod:`finegrained.svm`), evaluated on the test
images with each image's and its flip's scores averaged. Computed on the first process; ``accuracy`` holds
top-1, top-5 and mean per-class accuracy (``finegrained test --svm true`` prints and records them)."""
from __future__ import annotations

from typing import Dict, Optional

import pytorch_lightning as pl

from finegrained.data_contract import require_fine_grained_data
from finegrained.svm import svm_accuracy


class SVMTest(pl.Callback):
    """Args:
        c: the SVMs' regularisation constant (the official code: 1).
    """

    def __init__(self, c: float = 1.0):
        self.c = float(c)
        self.accuracy: Optional[Dict[str, float]] = None

    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.accuracy = None

    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        datamodule = require_fine_grained_data(trainer.datamodule, "the SVM test (--svm)")
        loader = datamodule.unaugmented_train_dataloader()
        self.accuracy = svm_accuracy(pl_module.network, loader.dataset, datamodule.test_dataset, c=self.c,
                                     batch_size=loader.batch_size, num_workers=loader.num_workers,
                                     device=pl_module.device)
