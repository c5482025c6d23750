"""Stanford Cars (Krause, Stark, Deng, Fei-Fei, "3D Object Representations for Fine-Grained
Categorization", 3dRR workshop at ICCV 2013).

16,185 images of 196 classes: 8,144 train, 8,041 test. The official URLs are dead, so copies come
from mirrors in several layouts; ``layout="auto"`` detects which:

* ``original`` (torchvision's): ``cars_train/``, ``cars_test/``, ``devkit/cars_meta.mat``,
  ``devkit/cars_train_annos.mat`` and ``cars_test_annos_withlabels.mat`` (top level or ``devkit/``).
* ``kaggle_nested``: images in ``cars_train/cars_train/`` and ``cars_test/cars_test/``; the devkit may sit
  in ``car_devkit/devkit/`` and the test labels may be ``cars_test_annos_withlabels (1).mat``.
* ``kaggle_folders``: the archive unpacks to ``car_data/`` holding ``names.csv`` (official order),
  optional ``anno_{train,test}.csv`` (``fname,x1,y1,x2,y2,class``) for boxes, and
  ``car_data/{train,test}/<class name>/*.jpg`` (the CSVs may also sit one level up). Folder names
  replace ``/`` by ``-`` (``Ram C-V Cargo Van Minivan 2012``); they are mapped back to official indices.
* ``combined`` (``car_ims.tgz`` + ``cars_annos.mat``, used by B-CNN's and other toolkits): ``car_ims/000001.jpg
  … 016185.jpg`` beside ``cars_annos.mat``, whose ``annotations`` have ``relative_im_path`` (``car_ims/…``),
  the box, ``class`` and ``test`` (0 train, 1 test) and whose ``class_names`` is the official list.

``root`` may be any folder level of these downloads: the folder holding the dataset, torchvision's
``stanford_cars/``, the outer or inner ``car_data/``, ``cars_train/`` of the nested copy, ``devkit/``,
``car_ims/``.

Annotations (``.mat``, read with scipy): ``class_names`` in ``cars_meta.mat`` (official order, not
alphabetical); ``annotations`` with fields ``bbox_x1, bbox_y1, bbox_x2, bbox_y2, class, fname``,
class 1..196 -> label = class − 1. The published input (resize to 448×448, so the 448 crop keeps the whole image,
and flip: the iSQRT-COV code) is set by ``recipes/_base/data/cars.yaml``.
"""
from __future__ import annotations

import csv
import os
from functools import cached_property
from typing import Dict, List, Optional, Tuple

import numpy as np

from datamodules.annotated import AnnotatedDataModule, find_dataset_dir
from datamodules.io import IMAGE_EXTENSIONS

LAYOUTS = ("original", "kaggle_nested", "kaggle_folders", "combined")
_DEVKIT_DIRS = ["devkit", "car_devkit/devkit", "."]
_CSV_DIRS = [".", "..", "car_data"]  # names.csv and anno_*.csv, relative to the outer car_data/
_TEST_LABEL_FILES = ["cars_test_annos_withlabels.mat", "cars_test_annos_withlabels (1).mat"]


def _find(folder: str, names: List[str], subdirs: List[str], what: str) -> str:
    tried = []
    for sub in subdirs:
        for name in names:
            path = os.path.normpath(os.path.join(folder, sub, name))
            if os.path.isfile(path):
                return path
            tried.append(path)
    raise FileNotFoundError(f"Stanford Cars {what} not found; searched: " + "; ".join(tried))


_TEXT_FIELDS = ("fname", "relative_im_path")


def read_mat_annotations(path: str, name_field: str = "fname") -> List[Dict]:
    """``annotations`` of a Stanford Cars ``.mat`` as dicts: bbox_x1..bbox_y2, class (if present) and the image
    name, ``fname`` in the devkit files, ``relative_im_path`` (and ``test``) in ``cars_annos.mat``."""
    from scipy.io import loadmat

    try:
        annotations = np.atleast_1d(loadmat(path, squeeze_me=True, variable_names=["annotations"])["annotations"])
    except KeyError:
        raise ValueError(f"{path}: no 'annotations' variable (expected a Stanford Cars annotation file)") from None
    fields = annotations.dtype.names or ()
    if name_field not in fields:
        raise ValueError(f"{path}: annotations have fields {fields}, expected bbox_x1, bbox_y1, bbox_x2, "
                         f"bbox_y2, class and {name_field}")
    return [{name: (str(row[name]) if name in _TEXT_FIELDS else int(row[name])) for name in fields}
            for row in annotations]


class StanfordCarsDataModule(AnnotatedDataModule):
    dataset_name = "Stanford Cars"
    dataset_id = "cars"

    def __init__(self, root: str, layout: str = "auto", bbox_crop: bool = False, val_fraction: float = 0.0,
                 seed: int = 0, **kwargs):
        if layout != "auto" and layout not in LAYOUTS:
            raise ValueError(f"layout must be 'auto' or one of {LAYOUTS}, got {layout!r}")
        super().__init__(root, bbox_crop=bbox_crop, val_fraction=val_fraction, seed=seed, **kwargs)
        self.save_hyperparameters()
        self.requested_layout = layout

    # The dataset folder of each layout holds these; kaggle_folders' is the outer car_data/.
    _MARKERS = {"kaggle_folders": ["car_data/train", "car_data/test"],
                "kaggle_nested": ["cars_train/cars_train", "cars_test/cars_test"],
                "original": ["cars_train", "cars_test"],
                "combined": ["car_ims", "cars_annos.mat"]}
    _CANDIDATES = [".", "stanford_cars", "car_data"]

    @cached_property
    def _located(self) -> Tuple[str, str]:
        layouts = LAYOUTS if self.requested_layout == "auto" else (self.requested_layout,)
        order = [l for l in ("kaggle_folders", "kaggle_nested", "original", "combined") if l in layouts]
        errors = []
        for layout in order:
            markers = self._MARKERS[layout]
            folder, searched = find_dataset_dir(self.root, markers, self._CANDIDATES, self.dataset_name)
            if folder is not None:
                return folder, layout
            errors.append(f"{layout}: expected {', '.join(markers)} in one of " + "; ".join(searched))
        raise FileNotFoundError(f"Stanford Cars not found under {self.root!r}; layouts searched: " + " | ".join(errors))

    @property
    def dataset_dir(self) -> str:
        return self._located[0]

    @property
    def layout(self) -> str:
        return self._located[1]

    @cached_property
    def class_names(self) -> List[str]:
        if self.layout == "kaggle_folders":
            path = _find(self.dataset_dir, ["names.csv"], _CSV_DIRS, "names.csv")
            with open(path, encoding="utf-8") as f:
                return [line.strip() for line in f.read().splitlines() if line.strip()]
        from scipy.io import loadmat

        if self.layout == "combined":
            path = os.path.join(self.dataset_dir, "cars_annos.mat")
        else:
            path = _find(self.dataset_dir, ["cars_meta.mat"], _DEVKIT_DIRS, "class list cars_meta.mat")
        try:
            names = loadmat(path, squeeze_me=True, variable_names=["class_names"])["class_names"]
            return [str(name) for name in np.atleast_1d(names)]
        except KeyError:
            raise ValueError(f"{path}: no 'class_names' variable (expected the 196 Stanford Cars class names)") from None

    def _mat_split(self, images_dir: str, annos_path: str, rows: Optional[List[Dict]] = None,
                   name_field: str = "fname") -> Tuple[List, List]:
        """Samples and 0-based boxes of the annotation rows of ``annos_path`` (all of its rows unless given)."""
        samples, boxes = [], []
        for row in read_mat_annotations(annos_path) if rows is None else rows:
            if "class" not in row:
                raise ValueError(f"{annos_path} has no 'class' field: it is the unlabelled test file; "
                                 f"use cars_test_annos_withlabels.mat")
            label = row["class"] - 1
            if not 0 <= label < len(self.class_names):
                raise ValueError(f"{annos_path}: {row[name_field]} has class {row['class']}, "
                                 f"expected 1..{len(self.class_names)}")
            samples.append((os.path.normpath(os.path.join(images_dir, row[name_field])), label))
            boxes.append((row["bbox_x1"] - 1, row["bbox_y1"] - 1, row["bbox_x2"], row["bbox_y2"]))
        return samples, boxes

    def _combined_splits(self) -> Tuple[Tuple[List, List], Tuple[List, List]]:
        """Train and test of ``cars_annos.mat`` (read once), split by its ``test`` flag; image paths are relative
        to the dataset folder."""
        annos = os.path.join(self.dataset_dir, "cars_annos.mat")
        rows = ([], [])
        for row in read_mat_annotations(annos, "relative_im_path"):
            if row.get("test") not in (0, 1):
                raise ValueError(f"{annos}: {row['relative_im_path']} has test={row.get('test')}, expected 0 or 1")
            rows[row["test"]].append(row)
        train, test = (self._mat_split(self.dataset_dir, annos, split, "relative_im_path") for split in rows)
        return train, test

    def _folder_split(self, split: str) -> Tuple[List, Optional[List]]:
        split_dir = os.path.join(self.dataset_dir, "car_data", split)
        index = {name.replace("/", "-"): i for i, name in enumerate(self.class_names)}
        samples = []
        for folder in sorted(os.listdir(split_dir)):
            if folder not in index:
                raise ValueError(f"{os.path.join(split_dir, folder)}: folder is not a class of names.csv")
            for name in os.listdir(os.path.join(split_dir, folder)):
                if name.lower().endswith(IMAGE_EXTENSIONS):
                    samples.append((os.path.join(split_dir, folder, name), index[folder]))
        samples.sort(key=lambda s: os.path.basename(s[0]))  # annotation order: 00001.jpg, 00002.jpg, ...
        if not self.bbox_crop:
            return samples, None
        anno = _find(self.dataset_dir, [f"anno_{split}.csv"], _CSV_DIRS, f"box file anno_{split}.csv")
        with open(anno, newline="", encoding="utf-8") as f:
            table = {r[0]: tuple(float(v) for v in r[1:5]) for r in csv.reader(f) if r}
        boxes = []
        for path, _ in samples:
            x1, y1, x2, y2 = table[os.path.basename(path)]
            boxes.append((x1 - 1, y1 - 1, x2, y2))
        return samples, boxes

    def read_splits(self):
        d = self.dataset_dir
        if self.layout == "kaggle_folders":
            return self._folder_split("train"), None, self._folder_split("test")
        if self.layout == "combined":
            train, test = self._combined_splits()
            return train, None, test
        nested = self.layout == "kaggle_nested"
        train_images = os.path.join(d, "cars_train", "cars_train" if nested else "")
        test_images = os.path.join(d, "cars_test", "cars_test" if nested else "")
        train = self._mat_split(train_images, _find(d, ["cars_train_annos.mat"], _DEVKIT_DIRS, "cars_train_annos.mat"))
        test = self._mat_split(test_images, _find(d, _TEST_LABEL_FILES, [".", "devkit", "car_devkit/devkit"],
                                                  "test labels cars_test_annos_withlabels.mat"))
        return train, None, test
