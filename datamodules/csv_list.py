"""Image lists in CSV files: ``path,label`` rows, paths relative to an image root.

A label is a class name or a 0-based index. Class names come from ``class_names`` or, when not
given, from the sorted names of the training CSV (or ``0..max`` for integer labels). A header row
``path,label`` is optional. A path that resolves outside the image root is refused.
"""
from __future__ import annotations

import os
from functools import cached_property
from typing import List, Optional, Tuple, Union

import pandas as pd

from datamodules.annotated import AnnotatedDataModule


def read_list(csv_path: str) -> List[Tuple[int, str, str]]:
    """``(line number, path, label)`` rows of a list file."""
    if not os.path.isfile(csv_path):
        raise FileNotFoundError(f"list file not found: {csv_path} (expected CSV rows 'path,label')")
    try:
        frame = pd.read_csv(csv_path, header=None, dtype=str, keep_default_na=False, skip_blank_lines=True,
                            skipinitialspace=True)
    except (pd.errors.ParserError, pd.errors.EmptyDataError) as err:
        raise ValueError(f"{csv_path}: not a CSV of 'path,label' rows ({err})") from err
    if frame.shape[1] != 2:
        raise ValueError(f"{csv_path}: expected 2 columns 'path,label', found {frame.shape[1]}")
    rows = [(i + 1, p.strip(), l.strip()) for i, (p, l) in enumerate(frame.itertuples(index=False))]
    if rows and (rows[0][1].lower(), rows[0][2].lower()) == ("path", "label"):
        rows = rows[1:]
    return rows


class CSVDataModule(AnnotatedDataModule):
    """Args:
        image_root: folder the CSV paths are relative to.
        train_csv, test_csv: list files; val_csv optional (else see ``val_fraction``).
        class_names: class order; inferred when omitted.
        exif_transpose: turn every image upright by its EXIF orientation (``PIL.ImageOps.exif_transpose``), for
            photos from cameras and phones. Recorded in ``preprocessing``, so exports and ``predict-images``
            decode the same way. Off (default): the stored pixels, as the benchmark datasets are read.
    """

    dataset_name = "CSV lists"
    dataset_id = "csv"

    def __init__(self, image_root: str, train_csv: str, test_csv: str, val_csv: Optional[str] = None,
                 class_names: Optional[List[str]] = None, val_fraction: float = 0.0, seed: int = 0,
                 batch_size: int = 32, num_workers: int = 4, resize_size: Union[int, List[int]] = 448,
                 crop_size: Union[int, List[int]] = 448, hflip: bool = True,
                 train_crop: str = "random", skip_corrupt: bool = False, exif_transpose: bool = False):
        super().__init__(image_root, bbox_crop=False, val_fraction=val_fraction, seed=seed, batch_size=batch_size,
                         num_workers=num_workers, resize_size=resize_size, crop_size=crop_size, hflip=hflip,
                         train_crop=train_crop, skip_corrupt=skip_corrupt)
        self._given_classes = list(class_names) if class_names else None
        # The model's class_names hyper-parameter holds the class names in use (LightningCLI links them from
        # this DataModule), and Lightning refuses a fit whose model and DataModule disagree on a shared key: an
        # omitted (inferred) class list is therefore left out here rather than recorded as None.
        self.save_hyperparameters(ignore=None if self._given_classes else ["class_names"])
        self.train_csv, self.val_csv, self.test_csv = train_csv, val_csv, test_csv
        self.preprocessing["exif_transpose"] = bool(exif_transpose)

    @cached_property
    def class_names(self) -> List[str]:
        if self._given_classes:
            return self._given_classes
        labels = [label for _, _, label in read_list(self.train_csv)]
        if labels and all(label.isdigit() for label in labels):
            files = [self.train_csv, self.test_csv] + ([self.val_csv] if self.val_csv else [])
            top = max(int(label) for f in files for _, _, label in read_list(f))
            return [str(i) for i in range(top + 1)]
        return sorted(set(labels))

    def _read(self, csv_path: str):
        root = os.path.realpath(self.root)
        if not os.path.isdir(root):
            raise FileNotFoundError(f"image root {self.root!r} does not exist")
        index = {name: i for i, name in enumerate(self.class_names)}
        samples = []
        for number, path, label in read_list(csv_path):
            full = os.path.realpath(os.path.join(root, path))
            if os.path.commonpath([full, root]) != root:
                raise ValueError(f"{csv_path}, line {number}: path {path!r} resolves outside the image root {root}")
            if label in index:
                target = index[label]
            elif label.isdigit() and int(label) < len(index):
                target = int(label)
            else:
                raise ValueError(f"{csv_path}, line {number}: label {label!r} is neither a class name nor an index "
                                 f"in 0..{len(index) - 1}")
            samples.append((full, target))
        return samples, None

    @property
    def has_official_validation(self) -> bool:
        return bool(self.val_csv)

    def read_splits(self):
        val = self._read(self.val_csv) if self.val_csv else None
        return self._read(self.train_csv), val, self._read(self.test_csv)
