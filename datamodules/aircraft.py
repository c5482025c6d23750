"""FGVC-Aircraft 2013b (Maji, Rahtu, Kannala, Blaschko, Vedaldi, arXiv:1306.5151, 2013).

10,000 images (``data/images/<7-digit id>.jpg``) at three levels: 100 variants, 70 families,
30 manufacturers. Splits: train 3,334, val 3,333, trainval 6,667, test 3,333. Label files
``images_<level>_<split>.txt`` hold ``<id> <name>`` where the name runs to the end of the line
(``F/A-18``, ``Falcon 2000``); class index = line order of ``variants.txt`` / ``families.txt`` /
``manufacturers.txt``. Every image carries a 20-pixel copyright banner at the bottom, which the
dataset's README asks users to remove (torchvision's ``FGVCAircraft`` keeps it); it is cropped here
by default. ``images_box.txt`` holds ``<id> x1 y1 x2 y2`` (1-based, inclusive).

Default transforms follow the iSQRT-COV fine-tuning code (fast-MPN-COV ``imagepreprocess.py``): resize to
512×512, centre crop 448 in training and at test, random flip in training.
"""
from __future__ import annotations

import os
from functools import cached_property
from typing import List

from datamodules.annotated import AnnotatedDataModule, read_fields, read_id_map

BANNER_ROWS = 20
_CLASS_FILES = {"variant": "variants.txt", "family": "families.txt", "manufacturer": "manufacturers.txt"}


class FGVCAircraftDataModule(AnnotatedDataModule):
    """Extra args:
        annotation_level: ``variant`` (100 classes), ``family`` (70) or ``manufacturer`` (30).
        train_split: ``trainval`` (6,667 images) or ``train`` (3,334, with ``val`` as validation set).
        crop_banner: remove the 20-pixel copyright banner (default on).
    """

    dataset_name = "FGVC-Aircraft 2013b"

    @property
    def dataset_id(self) -> str:
        """``aircraft`` for the 100 variants (the papers' benchmark), ``aircraft_family`` / ``aircraft_manufacturer``."""
        return "aircraft" if self.annotation_level == "variant" else f"aircraft_{self.annotation_level}"
    markers = ("variants.txt", "images")  # the data/ folder
    candidates = ("data", "fgvc-aircraft-2013b/data", ".")

    def __init__(self, root: str, annotation_level: str = "variant", train_split: str = "trainval",
                 crop_banner: bool = True, bbox_crop: bool = False, val_fraction: float = 0.0, seed: int = 0,
                 **kwargs):
        if annotation_level not in _CLASS_FILES:
            raise ValueError(f"annotation_level must be one of {sorted(_CLASS_FILES)}, got {annotation_level!r}")
        if train_split not in ("trainval", "train"):
            raise ValueError(f"train_split must be 'trainval' or 'train', got {train_split!r}")
        super().__init__(root, bbox_crop=bbox_crop, val_fraction=val_fraction, seed=seed, **kwargs)
        self.save_hyperparameters()
        self.annotation_level = annotation_level
        self.train_split = train_split
        self.crop_bottom_rows(BANNER_ROWS if crop_banner else 0)

    @cached_property
    def class_names(self) -> List[str]:
        path = os.path.join(self.dataset_dir, _CLASS_FILES[self.annotation_level])
        if not os.path.isfile(path):
            raise FileNotFoundError(f"annotation file not found: {path} (expected one class name per line)")
        with open(path, encoding="utf-8") as f:
            return [line.strip() for line in f.read().splitlines() if line.strip()]

    def _split(self, split: str, boxes: dict):
        path = os.path.join(self.dataset_dir, f"images_{self.annotation_level}_{split}.txt")
        index = {name: i for i, name in enumerate(self.class_names)}
        samples, split_boxes = [], []
        for number, (image_id, name) in read_fields(path, 2, "'<image id> <class name>'"):
            if name not in index:
                raise ValueError(f"{path}, line {number}: class {name!r} is not in "
                                 f"{_CLASS_FILES[self.annotation_level]}")
            samples.append((os.path.join(self.dataset_dir, "images", f"{image_id}.jpg"), index[name]))
            if self.bbox_crop:
                if image_id not in boxes:
                    raise ValueError(f"{os.path.join(self.dataset_dir, 'images_box.txt')}: no box for image {image_id}")
                x1, y1, x2, y2 = map(float, boxes[image_id])
                split_boxes.append((x1 - 1, y1 - 1, x2, y2))  # 1-based inclusive -> PIL box
        return samples, (split_boxes if self.bbox_crop else None)

    @property
    def has_official_validation(self) -> bool:
        return self.train_split == "train"

    def read_splits(self):
        boxes = (read_id_map(os.path.join(self.dataset_dir, "images_box.txt"), 5, "'<id> <x1> <y1> <x2> <y2>'")
                 if self.bbox_crop else {})
        train = self._split(self.train_split, boxes)
        val = self._split("val", boxes) if self.train_split == "train" else None
        return train, val, self._split("test", boxes)
