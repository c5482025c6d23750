"""Your own data: one folder per class, ``root/{train,val,test}/<class>/<image>``.

Classes are the sorted folder names of ``root/train`` (as torchvision's ImageFolder).
``val`` may also be spelled ``valid``/``validation``; without it, a stratified
``val_fraction`` of train is held out (scikit-learn, fixed seed). Without ``test``,
the validation set doubles as the test set and a warning says so.
"""
from __future__ import annotations

import logging
import os
import warnings
from functools import cached_property
from typing import List, Tuple

from torchvision.datasets.folder import make_dataset

from datamodules.base import FineGrainedDataModule
from datamodules.datasets import ImageListDataset
from datamodules.io import IMAGE_EXTENSIONS
from datamodules.splits import stratified_holdout

log = logging.getLogger(__name__)

_SPLIT_NAMES = {"train": ("train", "training"), "val": ("val", "valid", "validation"),
                "test": ("test", "testing")}


class ImageFolderDataModule(FineGrainedDataModule):
    """Args:
        root: folder holding ``train/`` (and optionally ``val/`` and ``test/``).
        val_fraction: share of train held out for validation when there is no val folder.
        seed: seed of that split.
        **kwargs: loader and transform settings of :class:`FineGrainedDataModule`.
    """

    def __init__(self, root: str, val_fraction: float = 0.1, seed: int = 0, **kwargs):
        super().__init__(**kwargs)
        self.save_hyperparameters()
        self.root = os.path.expanduser(root)
        self.val_fraction = val_fraction
        self.seed = seed

    def _split_dir(self, split: str):
        for name in _SPLIT_NAMES[split]:
            path = os.path.join(self.root, name)
            if os.path.isdir(path):
                return path
        return None

    @cached_property
    def class_names(self) -> List[str]:
        if not os.path.isdir(self.root):
            raise FileNotFoundError(f"dataset root {self.root!r} does not exist; expected a folder with "
                                    f"train/<class>/<image> (and optionally val/ and test/)")
        train_dir = self._split_dir("train")
        if train_dir is None:
            raise FileNotFoundError(f"{self.root!r} has no train/ folder; expected "
                                    f"{self.root}/train/<class>/<image>")
        classes = sorted(e.name for e in os.scandir(train_dir) if e.is_dir())
        if not classes:
            raise FileNotFoundError(f"{train_dir!r} has no class folders; expected {train_dir}/<class>/<image>")
        return classes

    def _samples(self, split_dir: str):
        index = {name: i for i, name in enumerate(self.class_names)}
        entries = list(os.scandir(split_dir))
        extra = sorted(set(e.name for e in entries if e.is_dir()) - set(index))
        if extra:
            raise ValueError(f"{split_dir!r} has class folders not in train/: {extra}")
        others = [e.path for e in entries
                  if e.is_file() and not e.name.lower().endswith(IMAGE_EXTENSIONS) and not e.name.startswith(".")]

        def is_image(path: str) -> bool:  # make_dataset's own walk also collects what is not an image
            if path.lower().endswith(IMAGE_EXTENSIONS):
                return True
            if not os.path.basename(path).startswith("."):
                others.append(path)
            return False

        samples = make_dataset(split_dir, index, is_valid_file=is_image, allow_empty=True)
        labels = {label for _, label in samples}
        empty = sorted(c for c, k in index.items() if k not in labels)
        if empty and os.path.basename(split_dir) == "train":
            raise ValueError(f"{split_dir!r}: class folder(s) {empty} hold no images; expected files ending in "
                             f"{', '.join(IMAGE_EXTENSIONS)} (remove the folder or add its images)")
        if others:
            log.warning("%s: ignoring %d file(s) that are not images (%s%s)", split_dir, len(others),
                        ", ".join(others[:3]), ", ..." if len(others) > 3 else "")
        return samples

    def build_datasets(self) -> Tuple[ImageListDataset, ImageListDataset, ImageListDataset]:
        classes = self.class_names
        train = self._samples(self._split_dir("train"))
        val_dir, test_dir = self._split_dir("val"), self._split_dir("test")
        if val_dir is not None:
            val = self._samples(val_dir)
        else:
            train, val, _, _ = stratified_holdout(train, [label for _, label in train], classes,
                                                  self.val_fraction, self.seed, repr(self._split_dir("train")))
        if test_dir is not None:
            test = self._samples(test_dir)
        else:
            warnings.warn(f"{self.root!r} has no test/ folder: the validation split is used as test set")
            test = val
        resize = self.preprocessing["resize"]  # large JPEGs are draft-decoded, as in every loader
        val_dataset = ImageListDataset(val, classes, self.eval_transform, resize=resize)
        test_dataset = val_dataset if test is val else ImageListDataset(test, classes, self.eval_transform, resize=resize)
        return ImageListDataset(train, classes, self.train_transform, resize=resize), val_dataset, test_dataset
