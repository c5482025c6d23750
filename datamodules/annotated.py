"""Base for datasets described by annotation files: locating the root, reading lists, assembling splits.

Every such DataModule accepts ``root`` at any folder level a download creates: the dataset folder, the
folder holding it, the wrapper folders of its archives, or a folder inside it (:func:`find_dataset_dir`),
optional bounding-box crops, and a validation policy: by default the test set serves as
validation, as in all published fine-grained code (and the log says so); ``val_fraction > 0``
holds out a stratified part of the training set instead, so no model is selected on test.
"""
from __future__ import annotations

import logging
import os
from functools import cached_property
from typing import Iterator, List, Optional, Sequence, Tuple

from datamodules.base import FineGrainedDataModule
from datamodules.datasets import ImageListDataset
from datamodules.splits import stratified_holdout

log = logging.getLogger(__name__)

Split = Tuple[List[Tuple[str, int]], Optional[List[Tuple[float, float, float, float]]]]


ANCESTOR_LEVELS = 2  # how far above ``root`` the dataset folder may be (root = images/, devkit/, car_data/car_data/)


def find_dataset_dir(root: str, markers: Sequence[str], candidates: Sequence[str],
                     dataset: str) -> Tuple[Optional[str], List[str]]:
    """``(the dataset folder or None, folders searched)`` for ``root`` at any level a download creates.

    Tried in order: ``root/<candidate>`` for every candidate (the folder itself, and the wrapper folders
    archives and tools create above it), then root's parent and grandparent (root given as a folder
    inside the dataset: ``images/``, ``devkit/``, the inner ``car_data/car_data/``). The dataset folder is
    the first that holds every marker. A missing root is an error.
    """
    root = os.path.abspath(os.path.expanduser(os.fspath(root)))
    if not os.path.isdir(root):
        raise FileNotFoundError(f"{dataset} root {root!r} does not exist")
    folders = [os.path.normpath(os.path.join(root, candidate)) for candidate in candidates]
    above = root
    for _ in range(ANCESTOR_LEVELS):
        above = os.path.dirname(above)
        folders.append(above)
    searched = []
    for folder in dict.fromkeys(folders):
        if all(os.path.exists(os.path.join(folder, m)) for m in markers):
            return folder, searched
        searched.append(folder)
    return None, searched


def resolve_dataset_dir(root: str, markers: Sequence[str], candidates: Sequence[str], dataset: str) -> str:
    """The dataset folder for ``root`` (see :func:`find_dataset_dir`); a clear error otherwise."""
    folder, searched = find_dataset_dir(root, markers, candidates, dataset)
    if folder is None:
        raise FileNotFoundError(f"{dataset} not found under {root!r}: expected {', '.join(markers)} in one of "
                                + "; ".join(searched))
    return folder


def read_fields(path: str, n_fields: int, what: str) -> Iterator[Tuple[int, List[str]]]:
    """Yield ``(line_number, fields)`` of a space-separated annotation file.

    The last field takes the rest of the line (names with spaces); blank lines and a missing
    trailing newline are fine; a short line is an error naming the file and line.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"annotation file not found: {path} (expected {what})")
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f.read().splitlines(), start=1):
            if not line.strip():
                continue
            fields = line.strip().split(" ", n_fields - 1)
            if len(fields) != n_fields:
                raise ValueError(f"{path}, line {number}: expected {what}, got {line!r}")
            yield number, fields


def read_id_map(path: str, n_fields: int, what: str) -> dict:
    """``{id: fields[1:]}`` from an annotation file; duplicate ids are an error."""
    table = {}
    for number, fields in read_fields(path, n_fields, what):
        if fields[0] in table:
            raise ValueError(f"{path}, line {number}: duplicate id {fields[0]!r}")
        table[fields[0]] = fields[1:]
    return table


def image_list_splits(dataset_dir: str, labels: dict, bbox_crop: bool) -> Tuple[Split, Split]:
    """(train, test) of the CUB / NABirds file set: ``images.txt`` (id, path under ``images/``),
    ``train_test_split.txt`` (id, 1 = train / 0 = test) and, with ``bbox_crop``, ``bounding_boxes.txt`` (id, x, y,
    width, height); ``labels`` maps every image id to its label. Missing entries are errors naming the file."""
    d = dataset_dir
    paths = read_id_map(os.path.join(d, "images.txt"), 2, "'<image_id> <path under images/>'")
    is_train = read_id_map(os.path.join(d, "train_test_split.txt"), 2, "'<image_id> <1|0>'")
    boxes = (read_id_map(os.path.join(d, "bounding_boxes.txt"), 5, "'<image_id> <x> <y> <width> <height>'")
             if bbox_crop else {})
    splits = {"1": ([], []), "0": ([], [])}
    for image_id, (relpath,) in paths.items():
        for table, name in ((labels, "image_class_labels.txt"), (is_train, "train_test_split.txt")):
            if image_id not in table:
                raise ValueError(f"{os.path.join(d, name)}: no entry for image id {image_id} of images.txt")
        flag = is_train[image_id][0]
        if flag not in splits:
            raise ValueError(f"{os.path.join(d, 'train_test_split.txt')}: image {image_id} has {flag!r}, "
                             f"expected 1 (train) or 0 (test)")
        samples, split_boxes = splits[flag]
        samples.append((os.path.join(d, "images", relpath), labels[image_id]))
        if bbox_crop:
            if image_id not in boxes:
                raise ValueError(f"{os.path.join(d, 'bounding_boxes.txt')}: no box for image id {image_id}")
            x, y, w, h = map(float, boxes[image_id])
            split_boxes.append((x, y, x + w, y + h))
    return tuple((samples, split_boxes if bbox_crop else None) for samples, split_boxes in (splits["1"], splits["0"]))


class AnnotatedDataModule(FineGrainedDataModule):
    """Args:
        root: the dataset folder or the folder holding it.
        bbox_crop: crop every image to its annotated bounding box.
        val_fraction: 0 = the test set serves as validation (published protocol); > 0 = stratified
            hold-out of that share of the training set.
        seed: seed of the hold-out.
        **kwargs: loader and transform settings of :class:`FineGrainedDataModule`.
    """

    dataset_name = "dataset"
    bottom_crop = 0  # rows cut from the bottom of every image (Aircraft's banner)
    # What identifies the dataset folder, and where it may sit relative to ``root`` (see find_dataset_dir).
    markers: Sequence[str] = ()
    candidates: Sequence[str] = (".",)

    def __init__(self, root: str, bbox_crop: bool = False, val_fraction: float = 0.0, seed: int = 0, **kwargs):
        super().__init__(**kwargs)
        self.root = os.path.expanduser(root)
        self.bbox_crop = bbox_crop
        self.val_fraction = val_fraction
        self.seed = seed

    @cached_property
    def dataset_dir(self) -> str:
        """The dataset folder: the first of ``candidates`` (or root's parent, grandparent) holding ``markers``."""
        return resolve_dataset_dir(self.root, self.markers, self.candidates, self.dataset_name)

    def crop_bottom_rows(self, rows: int) -> None:
        """Remove ``rows`` stored rows at the bottom of every image, and record it with the preprocessing so
        that exports and ``predict-images`` decode as the test loader does."""
        self.bottom_crop = rows
        if rows:
            self.preprocessing["bottom_crop"] = rows

    def read_splits(self) -> Tuple[Split, Optional[Split], Split]:
        """Return (train, official val or None, test) as (samples, boxes-or-None)."""
        raise NotImplementedError

    @property
    def has_official_validation(self) -> bool:
        """Whether the chosen splits include an official validation split (e.g. Aircraft's ``val`` with
        ``train_split: train``)."""
        return False

    @property
    def validation_is_test(self) -> bool:
        return self.val_fraction <= 0 and not self.has_official_validation

    def build_datasets(self):
        classes = self.class_names
        train, val, test = self.read_splits()
        for name, (samples, _) in (("train", train), ("test", test)):
            if not samples:
                raise ValueError(f"{self.dataset_name} under {self.root!r}: the {name} split is empty")
        if self.val_fraction > 0:
            samples, boxes = train
            kept, held, kept_idx, held_idx = stratified_holdout(
                samples, [label for _, label in samples], classes, self.val_fraction, self.seed,
                f"the {self.dataset_name} training set")
            train = (kept, [boxes[i] for i in kept_idx] if boxes else None)
            val = (held, [boxes[i] for i in held_idx] if boxes else None)
        elif val is None:
            log.info("%s: the test set serves as validation set, as in the published code; set val_fraction > 0 "
                     "to select models on held-out training images instead", self.dataset_name)
            val = test

        def dataset(split: Split, transform) -> ImageListDataset:
            samples, boxes = split
            return ImageListDataset(samples, classes, transform, boxes=boxes if self.bbox_crop else None,
                                    bottom_crop=self.bottom_crop, resize=self.preprocessing["resize"],
                                    exif_transpose=self.preprocessing["exif_transpose"])

        test_dataset = dataset(test, self.eval_transform)
        val_dataset = test_dataset if val is test else dataset(val, self.eval_transform)
        return dataset(train, self.train_transform), val_dataset, test_dataset
