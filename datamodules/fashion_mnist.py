"""Fashion-MNIST, the embedded default: real labelled images that install offline.

Xiao, Rasul, Vollgraf, "Fashion-MNIST: a Novel Image Dataset for Benchmarking Machine
Learning Algorithms", arXiv:1708.07747, 2017. 60,000 train + 10,000 test 28×28 grayscale
images of 10 classes; shirt / T-shirt / pullover / coat are famously confusable.

Sources, in order: the idx files of Debian's ``dataset-fashion-mnist`` package
(``/usr/share/datasets/fashion-mnist``), files already unpacked under ``data_dir``, or
torchvision's download when the machine is online. Images are upsampled to ``image_size``
and given 3 channels, so ImageNet backbones apply unchanged.

Splits: ``subset_per_class`` train images per class (all when ``None``), ``val_per_class``
held out from the rest of the official train set, ``test_per_class`` from the official test set.
"""
from __future__ import annotations

import gzip
import os
import shutil
from typing import Optional, Tuple

import numpy as np
from sklearn.model_selection import train_test_split
from torchvision.datasets import FashionMNIST

from datamodules.base import FineGrainedDataModule
from datamodules.datasets import ArrayImageDataset

DEBIAN_DIR = "/usr/share/datasets/fashion-mnist"
_FILES = ["train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
          "t10k-labels-idx1-ubyte"]


def default_data_dir() -> str:
    return os.environ.get("FINEGRAINED_DATA", os.path.join(os.path.expanduser("~"), ".cache", "finegrained"))


def _unpack_debian_files(raw_dir: str, source_dir: Optional[str] = None) -> bool:
    """Ungzip Debian's idx files into torchvision's raw folder; False if the package is absent."""
    source_dir = source_dir or DEBIAN_DIR
    if not all(os.path.isfile(os.path.join(source_dir, f + ".gz")) for f in _FILES):
        return False
    os.makedirs(raw_dir, exist_ok=True)
    for name in _FILES:
        target = os.path.join(raw_dir, name)
        if not os.path.isfile(target):
            tmp = target + ".part"
            with gzip.open(os.path.join(source_dir, name + ".gz"), "rb") as src, open(tmp, "wb") as dst:
                shutil.copyfileobj(src, dst)
            os.replace(tmp, target)  # atomic: an interrupted unpack never leaves a short file
    return True


def _stratified_take(labels: np.ndarray, per_class: Optional[int], seed: int,
                     exclude: Optional[np.ndarray] = None) -> np.ndarray:
    """Indices of ``per_class`` examples of every class (all when None), chosen with a fixed seed."""
    pool = np.arange(len(labels))
    if exclude is not None:
        pool = np.setdiff1d(pool, exclude)
    n_classes = int(labels.max()) + 1
    if per_class == 0:
        return pool[:0]
    if per_class is None or per_class * n_classes >= len(pool):
        return pool
    taken, _ = train_test_split(pool, train_size=per_class * n_classes, stratify=labels[pool],
                                random_state=seed)
    return np.sort(taken)


class FashionMNISTDataModule(FineGrainedDataModule):
    """Args:
        data_dir: cache folder (``$FINEGRAINED_DATA`` or ``~/.cache/finegrained`` by default).
        image_size: side of the square network input; images are resized to 9/8 of it and cropped.
        subset_per_class: train images per class (``None`` = every official train image not held out).
        val_per_class: validation images per class, held out from the official train set.
        test_per_class: test images per class from the official test set (``None`` = all 10,000).
        seed: seed of the subsets.
        download: allow torchvision's download when no local copy exists.
        batch_size, num_workers, hflip, train_crop: as in :class:`FineGrainedDataModule`.
    """

    dataset_name = "Fashion-MNIST"
    dataset_id = "fashion_mnist"

    def __init__(self, data_dir: Optional[str] = None, image_size: int = 96,
                 subset_per_class: Optional[int] = None, val_per_class: int = 50,
                 test_per_class: Optional[int] = None, seed: int = 0, download: bool = True,
                 batch_size: int = 32, num_workers: int = 2, hflip: bool = True, train_crop: str = "random"):
        super().__init__(batch_size=batch_size, num_workers=num_workers, resize_size=image_size * 9 // 8,
                         crop_size=image_size, hflip=hflip, train_crop=train_crop)
        self.save_hyperparameters()
        self.data_dir = data_dir or default_data_dir()
        self.subset_per_class = subset_per_class
        self.val_per_class = val_per_class
        self.test_per_class = test_per_class
        self.seed = seed
        self.download = download

    @property
    def class_names(self):
        return list(FashionMNIST.classes)

    def prepare_data(self) -> None:
        self._load(train=True)
        self._load(train=False)

    def _load(self, train: bool) -> FashionMNIST:
        raw_dir = os.path.join(self.data_dir, "FashionMNIST", "raw")
        _unpack_debian_files(raw_dir)
        try:
            return FashionMNIST(self.data_dir, train=train, download=False)
        except RuntimeError:
            if not self.download:
                raise self._missing_error(raw_dir) from None
        try:
            return FashionMNIST(self.data_dir, train=train, download=True)
        except Exception as err:
            raise self._missing_error(raw_dir) from err

    @staticmethod
    def _missing_error(raw_dir: str) -> FileNotFoundError:
        return FileNotFoundError(
            f"Fashion-MNIST not found: expected {DEBIAN_DIR}/{{{','.join(_FILES)}}}.gz "
            f"(Debian package dataset-fashion-mnist: apt-get install dataset-fashion-mnist) or the "
            f"unpacked files in {raw_dir}, and the download failed (offline?).")

    @property
    def validation_is_test(self) -> bool:
        return False  # validation images are held out from the official train set

    def build_datasets(self) -> Tuple[ArrayImageDataset, ArrayImageDataset, ArrayImageDataset]:
        official_train, official_test = self._load(train=True), self._load(train=False)
        images, labels = official_train.data.numpy(), official_train.targets.numpy()
        val_idx = _stratified_take(labels, self.val_per_class, self.seed)
        train_idx = _stratified_take(labels, self.subset_per_class, self.seed, exclude=val_idx)
        test_images, test_labels = official_test.data.numpy(), official_test.targets.numpy()
        test_idx = _stratified_take(test_labels, self.test_per_class, self.seed)
        classes = self.class_names
        return (ArrayImageDataset(images[train_idx], labels[train_idx], classes, self.train_transform),
                ArrayImageDataset(images[val_idx], labels[val_idx], classes, self.eval_transform),
                ArrayImageDataset(test_images[test_idx], test_labels[test_idx], classes, self.eval_transform))
