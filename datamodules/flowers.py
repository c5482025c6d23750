"""Oxford Flowers-102 (Nilsback & Zisserman, "Automated flower classification over a large number of classes",
ICVGIP 2008): 8,189 images of 102 flower categories; train 1,020 / val 1,020 / test 6,149 (the test set is
the largest).

``102flowers.tgz`` unpacks to ``jpg/image_00001.jpg … image_08189.jpg``; ``imagelabels.mat`` (``labels``, 1..102 for
every image) and ``setid.mat`` (``trnid``, ``valid``, ``tstid``: 1-based image ids) are separate downloads
(torchvision keeps all three under ``flowers-102/``). Labels are ``imagelabels − 1``; the archive has no class
names, so they are torchvision's ``Flowers102.classes`` (in label order).

Protocol: as the fine-grained transfer papers (and the FGVC-Aircraft DataModule here) do, the default trains on
train + val (``trnid`` and ``valid``, 2,040 images) and tests on the 6,149 ``tstid`` images, with the test set as
validation set (``val_fraction`` > 0 holds out part of train + val instead). ``train_split="train"`` trains on
``trnid`` alone with the official validation split as validation set.
"""
from __future__ import annotations

import os
from functools import cached_property
from typing import List

from datamodules.annotated import AnnotatedDataModule
from datamodules.dogs import read_mat


class Flowers102DataModule(AnnotatedDataModule):
    """Args: ``root`` (``flowers-102/``, its parent, or ``jpg/``), ``train_split`` (``trainval``: ``trnid`` +
    ``valid``, 2,040 images, the default; ``train``: ``trnid`` alone, with ``valid`` as validation set),
    ``val_fraction``, ``seed`` and the loader/transform settings of
    :class:`~datamodules.base.FineGrainedDataModule`."""

    dataset_name = "Oxford Flowers-102"
    dataset_id = "flowers102"
    markers = ("imagelabels.mat", "setid.mat", "jpg")
    candidates = (".", "flowers-102", "flowers102")

    def __init__(self, root: str, train_split: str = "trainval", val_fraction: float = 0.0, seed: int = 0,
                 **kwargs):
        if train_split not in ("trainval", "train"):
            raise ValueError(f"train_split must be 'trainval' or 'train', got {train_split!r}")
        super().__init__(root, bbox_crop=False, val_fraction=val_fraction, seed=seed, **kwargs)
        self.train_split = train_split
        self.save_hyperparameters()

    @property
    def class_names(self) -> List[str]:
        from torchvision.datasets import Flowers102

        return list(Flowers102.classes)

    @cached_property
    def _labels(self) -> List[int]:
        path = os.path.join(self.dataset_dir, "imagelabels.mat")
        labels = [int(v) - 1 for v in read_mat(path, ["labels"])["labels"].ravel()]
        bad = [k + 1 for k, v in enumerate(labels) if not 0 <= v < 102]
        if bad:
            raise ValueError(f"{path}: image {bad[0]} has label {labels[bad[0] - 1] + 1}, expected 1..102")
        return labels

    @property
    def has_official_validation(self) -> bool:
        return self.train_split == "train"

    def read_splits(self):
        path = os.path.join(self.dataset_dir, "setid.mat")
        ids = read_mat(path, ["trnid", "valid", "tstid"])
        splits = []
        for key in ("trnid", "valid", "tstid"):
            samples = []
            for image_id in (int(v) for v in ids[key].ravel()):
                if not 1 <= image_id <= len(self._labels):
                    raise ValueError(f"{path}: {key} holds image id {image_id}, but imagelabels.mat labels "
                                     f"images 1..{len(self._labels)}")
                samples.append((os.path.join(self.dataset_dir, "jpg", f"image_{image_id:05d}.jpg"),
                                self._labels[image_id - 1]))
            splits.append((samples, None))
        train, val, test = splits
        if self.train_split == "trainval":  # the test set validates (or a hold-out, with val_fraction > 0)
            return (train[0] + val[0], None), None, test
        return train, val, test  # a hold-out (val_fraction > 0) replaces the official validation split
