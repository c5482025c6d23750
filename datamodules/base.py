"""Base LightningDataModule with the fine-grained transforms.

Subclasses implement :meth:`FineGrainedDataModule.build_datasets` and :attr:`class_names`.
After ``setup()`` every DataModule exposes ``train_dataset``, ``val_dataset``,
``test_dataset``, ``num_classes`` and ``class_names``; batches are
``(images (B, 3, crop, crop) float32, labels (B,) int64)``.
"""
from __future__ import annotations

import copy
from typing import List, Optional, Sequence, Tuple, Union

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset

from datamodules.transforms import (IMAGENET_MEAN, IMAGENET_STD, eval_transform, preprocessing_spec,
                                    train_transform)


class FineGrainedDataModule(pl.LightningDataModule):
    """Common loader and transform settings.

    Args:
        batch_size: images per batch (per process under DDP).
        num_workers: DataLoader worker processes.
        resize_size: int = shorter side (aspect kept) or [h, w].
        crop_size: square crop side, or [h, w].
        mean: per-channel mean of the normalisation (ImageNet's by default).
        std: per-channel standard deviation of the normalisation (ImageNet's by default).
        hflip: random horizontal flips in training.
        train_crop: ``"random"`` or ``"center"`` crop of ``crop_size`` in training (the protocol's choice:
            the official iSQRT-COV fine-tuning crops the centre, compact bilinear pooling a random patch).
        skip_corrupt: off (default): an unreadable image stops the run with an error naming the file.
            On: it is logged once (a warning naming the file and why) and the next readable image of
            the split takes its place, so a bad file in hour 20 does not cost the run.
    """

    # The dataset's name as people write it, and its id in run records and results/reference.csv ("cub", ...).
    dataset_name = "images"
    dataset_id = "custom"

    def __init__(self, batch_size: int = 32, num_workers: int = 2,
                 resize_size: Union[int, List[int]] = 512, crop_size: Union[int, List[int]] = 448,
                 mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD,
                 hflip: bool = True, train_crop: str = "random", skip_corrupt: bool = False):
        super().__init__()
        self.skip_corrupt = skip_corrupt
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.preprocessing = preprocessing_spec(resize_size, crop_size, mean, std)
        self.train_transform = train_transform(resize_size, crop_size, mean, std, hflip, train_crop)
        self.eval_transform = eval_transform(self.preprocessing)
        self.train_dataset: Optional[Dataset] = None
        self.val_dataset: Optional[Dataset] = None
        self.test_dataset: Optional[Dataset] = None

    # -- to implement ---------------------------------------------------------------------
    @property
    def class_names(self) -> List[str]:
        raise NotImplementedError

    def build_datasets(self) -> Tuple[Dataset, Dataset, Dataset]:
        """Return (train, val, test) datasets with the train/eval transforms attached."""
        raise NotImplementedError

    # -- shared ---------------------------------------------------------------------------
    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def validation_is_test(self) -> bool:
        """Whether validation runs on the test split (the published protocol, ``val_fraction = 0``, or a folder
        without test/): a checkpoint chosen by validation would then be chosen on the test set. Decided from the
        settings and the layout, without reading the splits: every DataModule says how."""
        raise NotImplementedError(f"{type(self).__name__} must say whether its validation split is its test split "
                                  f"(a validation_is_test property, from its settings; see datamodules.base)")

    def setup(self, stage: Optional[str] = None) -> None:
        if self.train_dataset is None:
            self.train_dataset, self.val_dataset, self.test_dataset = self.build_datasets()
            for dataset in (self.train_dataset, self.val_dataset, self.test_dataset):
                dataset.skip_corrupt = self.skip_corrupt  # every dataset here honours it (datamodules.datasets)

    def _loader(self, dataset: Dataset, shuffle: bool) -> DataLoader:
        sampler = None
        if not shuffle and torch.distributed.is_available() and torch.distributed.is_initialized() \
                and torch.distributed.get_world_size() > 1:
            # Lightning's default DistributedSampler pads the last rank with repeated images, so a
            # multi-process evaluation would count some twice; this one splits without repeats
            # (torchmetrics then sums the per-rank counts exactly).
            from pytorch_lightning.overrides.distributed import UnrepeatedDistributedSampler

            sampler = UnrepeatedDistributedSampler(dataset, shuffle=False)
        return DataLoader(dataset, batch_size=self.batch_size, shuffle=shuffle, sampler=sampler, drop_last=False,
                          num_workers=self.num_workers, persistent_workers=self.num_workers > 0,
                          pin_memory=False)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_dataset, shuffle=True)

    def unaugmented_train_dataloader(self) -> DataLoader:
        """The training images with the evaluation transform, in order, for features computed once (the
        cached first stage of the two-stage protocols, the SVM test protocol). On one process only."""
        self.setup("fit")
        dataset = copy.copy(self.train_dataset)
        dataset.transform = self.eval_transform
        return DataLoader(dataset, batch_size=self.batch_size, shuffle=False, num_workers=self.num_workers)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_dataset, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_dataset, shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader(self.test_dataset, shuffle=False)
