"""Hugging Face ``datasets`` as fine-grained DataModules.

``HuggingFaceDataModule(path)`` reads, in this order: a dataset saved with ``datasets.save_to_disk`` (a folder with
``dataset_dict.json``), a folder of parquet files (``<split>-*.parquet``, ``data/<split>-*.parquet`` or
``<split>/*.parquet``, as the Hub stores them), or, when online, a Hub dataset name. Images come from the
``image_column`` (an ``Image`` feature, decoded by ``datasets`` and converted to RGB), labels from the
``label_column``; class names from its ``ClassLabel`` feature (``"0"``, ``"1"``, … for a plain integer column).
Transforms and the validation rule are those of the other DataModules: ``val_split`` when given, else a
stratified ``val_fraction`` of train when > 0, else the test split serves as validation (logged).

Shapes: each item is (image (3, crop, crop), label).
"""
from __future__ import annotations

import glob
import logging
import os
from functools import cached_property
from typing import List, Optional

from PIL import Image
from torch.utils.data import Dataset

from datamodules.base import FineGrainedDataModule
from datamodules.datasets import first_readable
from datamodules.io import ImageLoadError, decode_bytes, load_rgb
from datamodules.splits import stratified_holdout

log = logging.getLogger(__name__)


class HuggingFaceImageDataset(Dataset):
    """Rows ``indices`` of one split of a ``datasets.Dataset``: (transformed image, label), ``targets``,
    ``classes`` and ``load_image(i)`` like the other datasets here.

    Images are decoded from the stored bytes by :mod:`datamodules.io` (not by ``datasets``), so they follow the
    same rules as image files: errors name the split and row, decompression bombs are refused, 16-bit grey is
    scaled, and ``skip_corrupt`` skips unreadable rows."""

    def __init__(self, table, image_column: str, label_column: str, classes: List[str], transform=None,
                 indices: Optional[List[int]] = None, name: str = "split"):
        import datasets

        self.image_column, self.label_column = image_column, label_column
        feature = table.features.get(image_column)
        # The encoded image ({"bytes", "path"}) rather than datasets' own decoding into PIL.
        self.table = table.cast_column(image_column, datasets.Image(decode=False)) if isinstance(
            feature, datasets.Image) else table
        self.classes, self.transform, self.name = list(classes), transform, name
        self.indices = list(range(len(table))) if indices is None else list(indices)
        labels = table[label_column]
        self.targets = [int(labels[i]) for i in self.indices]
        self.skip_corrupt = False
        self.skipped: set = set()

    def __len__(self) -> int:
        return len(self.indices)

    def sample_name(self, index: int) -> str:
        return f"{self.name} row {self.indices[index]}"

    def load_image(self, index: int) -> Image.Image:
        name = self.sample_name(index)
        value = self.table[self.indices[index]][self.image_column]
        if isinstance(value, Image.Image):  # a column datasets decodes itself
            return value.convert("RGB")
        if not isinstance(value, dict) or not (value.get("bytes") or value.get("path")):
            raise ImageLoadError(f"{name}: column {self.image_column!r} holds {type(value).__name__}, not an image; "
                                 f"expected an Image feature")
        if value.get("bytes"):
            return decode_bytes(value["bytes"], name)
        return load_rgb(value["path"])

    def __getitem__(self, index: int):
        image, read = first_readable(self, index)
        return (self.transform(image) if self.transform else image), self.targets[read]


def load_splits(path: str):
    """A ``datasets.DatasetDict`` from a ``save_to_disk`` folder, a folder of parquet files, or a Hub name."""
    import datasets

    if os.path.isdir(path):
        if os.path.isfile(os.path.join(path, "dataset_dict.json")):
            return datasets.load_from_disk(path)
        files = {}
        for pattern in ("*-*.parquet", "data/*-*.parquet", "*/*.parquet", "data/*/*.parquet"):
            for found in glob.glob(os.path.join(path, pattern)):
                name = os.path.basename(found)
                # data/<split>-00000-of-00001.parquet names the split in the file, <split>/0000.parquet in the folder
                split = name.split("-")[0] if "-" in name else os.path.basename(os.path.dirname(found))
                files.setdefault(split, set()).add(os.path.abspath(found))
        if files:
            return datasets.load_dataset("parquet", data_files={k: sorted(v) for k, v in files.items()})
        raise FileNotFoundError(f"{path}: neither a datasets.save_to_disk folder (dataset_dict.json) nor parquet "
                                f"files (<split>-*.parquet, data/<split>-*.parquet or <split>/*.parquet)")
    try:
        return datasets.load_dataset(path)
    except Exception as err:  # offline, or no such dataset: one line naming what was tried
        raise FileNotFoundError(f"{path!r} is not a folder, and loading it from the Hugging Face Hub failed "
                                f"({type(err).__name__}: {str(err)[:200]})") from err


class HuggingFaceDataModule(FineGrainedDataModule):
    """Args:
        path: a ``save_to_disk`` folder, a folder of parquet files, or a Hub dataset name (online).
        image_column, label_column: column names (they vary between copies; read them from the dataset card).
        train_split, test_split: split names; val_split: an official validation split, if any.
        val_fraction, seed: stratified hold-out of train when there is no ``val_split``; 0 = the test split
            serves as validation.
        **kwargs: loader and transform settings of :class:`~datamodules.base.FineGrainedDataModule`.
    """

    dataset_name = "Hugging Face dataset"
    dataset_id = "huggingface"

    def __init__(self, path: str, image_column: str = "image", label_column: str = "label",
                 train_split: str = "train", test_split: str = "test", val_split: Optional[str] = None,
                 val_fraction: float = 0.0, seed: int = 0, **kwargs):
        super().__init__(**kwargs)
        self.path, self.image_column, self.label_column = path, image_column, label_column
        self.train_split, self.test_split, self.val_split = train_split, test_split, val_split
        self.val_fraction, self.seed = val_fraction, seed
        self.save_hyperparameters()

    @cached_property
    def _splits(self):
        splits = load_splits(self.path)
        for name in (self.train_split, self.test_split, self.val_split):
            if name is not None and name not in splits:
                raise ValueError(f"{self.path}: no split {name!r}; it has {', '.join(splits)}")
        features = splits[self.train_split].features
        for column in (self.image_column, self.label_column):
            if column not in features:
                raise ValueError(f"{self.path}: no column {column!r}; columns are {', '.join(features)}")
        return splits

    @property
    def class_names(self) -> List[str]:
        feature = self._splits[self.train_split].features[self.label_column]
        if hasattr(feature, "names"):
            return list(feature.names)
        labels = self._splits[self.train_split][self.label_column]
        return [str(k) for k in range(max(int(v) for v in labels) + 1)]

    @property
    def validation_is_test(self) -> bool:
        return not self.val_split and self.val_fraction <= 0

    def build_datasets(self):
        classes = self.class_names

        def dataset(split: str, transform, indices=None) -> HuggingFaceImageDataset:
            return HuggingFaceImageDataset(self._splits[split], self.image_column, self.label_column, classes,
                                           transform, indices, name=f"{self.path} [{split}]")

        train = dataset(self.train_split, self.train_transform)
        test = dataset(self.test_split, self.eval_transform)
        if self.val_split:
            return train, dataset(self.val_split, self.eval_transform), test
        if self.val_fraction > 0:
            kept, held, _, _ = stratified_holdout(train.indices, train.targets, classes, self.val_fraction, self.seed,
                                                  f"{self.path} [{self.train_split}]")
            return (dataset(self.train_split, self.train_transform, kept),
                    dataset(self.train_split, self.eval_transform, held), test)
        log.info("%s: the %s split serves as validation set; set val_fraction > 0 or val_split to select models "
                 "on other images", self.path, self.test_split)
        return train, test, test
