"""Stanford Dogs (Khosla, Jayadevaprakash, Yao, Fei-Fei, "Novel dataset for fine-grained image categorization",
CVPR Workshop on FGVC 2011): 20,580 ImageNet images of 120 breeds, 12,000 train (100 per class) / 8,580 test.

``images.tar`` unpacks to ``Images/<wnid>-<Breed>/<wnid>_<n>.jpg``, ``annotation.tar`` to
``Annotation/<wnid>-<Breed>/<wnid>_<n>`` (Pascal VOC XML without extension, one ``<object>`` per dog) and
``lists.tar`` to ``train_list.mat`` / ``test_list.mat`` at the top level (keys ``file_list``,
``annotation_list``, ``labels``: 1-based). Labels are ``labels − 1``; class names are the folder names
(``n02085620-Chihuahua``) in label order. With ``bbox_crop`` an image is cropped to the union of its dog boxes
(the label is every dog's breed, so no dog is cut away).
"""
from __future__ import annotations

import os
import xml.etree.ElementTree as ElementTree
from functools import cached_property
from typing import Dict, List, Tuple

from datamodules.annotated import AnnotatedDataModule


def read_mat(path: str, keys: List[str]) -> dict:
    """The arrays ``keys`` of a MATLAB file; a clear error naming the file and what it lacks."""
    import scipy.io

    if not os.path.isfile(path):
        raise FileNotFoundError(f"annotation file not found: {path} (expected a MATLAB file with {', '.join(keys)})")
    try:
        content = scipy.io.loadmat(path)
    except Exception as err:  # a truncated or foreign file: scipy raises several types
        raise ValueError(f"{path}: cannot read as a MATLAB file ({err})") from err
    missing = [k for k in keys if k not in content]
    if missing:
        raise ValueError(f"{path}: no {', '.join(missing)} (expected keys {', '.join(keys)})")
    return content


def union_of_boxes(path: str) -> Tuple[float, float, float, float]:
    """The box (left, upper, right, lower) covering every ``<object><bndbox>`` of a VOC XML file."""
    try:
        tree = ElementTree.parse(path)
    except (OSError, ElementTree.ParseError) as err:
        raise ValueError(f"{path}: cannot read the annotation XML ({err})") from err
    boxes = []
    for number, box in enumerate(tree.getroot().iter("bndbox"), start=1):
        try:
            boxes.append([float(box.find(k).text) for k in ("xmin", "ymin", "xmax", "ymax")])
        except (AttributeError, TypeError, ValueError):
            raise ValueError(f"{path}: object {number} has no numeric xmin/ymin/xmax/ymax") from None
    if not boxes:
        raise ValueError(f"{path}: no <bndbox> (expected one per dog)")
    return (min(b[0] for b in boxes), min(b[1] for b in boxes), max(b[2] for b in boxes), max(b[3] for b in boxes))


class StanfordDogsDataModule(AnnotatedDataModule):
    """Args: ``root`` (the folder holding ``Images/``, ``Annotation/`` and the lists, its parent, or a folder
    inside it), ``bbox_crop``, ``val_fraction``, ``seed`` and the loader/transform settings of
    :class:`~datamodules.base.FineGrainedDataModule`."""

    dataset_name = "Stanford Dogs"
    dataset_id = "dogs"
    markers = ("train_list.mat", "test_list.mat", "Images")
    candidates = (".", "stanford_dogs", "StanfordDogs", "stanford-dogs")

    def __init__(self, root: str, bbox_crop: bool = False, val_fraction: float = 0.0, seed: int = 0, **kwargs):
        super().__init__(root, bbox_crop=bbox_crop, val_fraction=val_fraction, seed=seed, **kwargs)
        self.save_hyperparameters()

    @cached_property
    def _lists(self) -> Dict[str, List[Tuple[str, int]]]:
        """``{split: [(annotation path 'folder/name', label), ...]}`` of ``train_list.mat`` and ``test_list.mat``."""
        return {split: self._read_list(split) for split in ("train", "test")}

    def _read_list(self, split: str) -> List[Tuple[str, int]]:
        path = os.path.join(self.dataset_dir, f"{split}_list.mat")
        content = read_mat(path, ["annotation_list", "labels"])
        names = [str(item[0][0]) if hasattr(item[0], "__len__") else str(item[0])
                 for item in content["annotation_list"]]
        labels = [int(item[0]) for item in content["labels"]]
        if len(names) != len(labels):
            raise ValueError(f"{path}: {len(names)} annotation_list entries but {len(labels)} labels")
        bad = [(n, label) for n, label in zip(names, labels) if not 1 <= label <= 120 or "/" not in n]
        if bad:
            raise ValueError(f"{path}: entry {bad[0]} is not '<wnid>-<Breed>/<wnid>_<n>' with a label in 1..120")
        return [(name, label - 1) for name, label in zip(names, labels)]

    @cached_property
    def class_names(self) -> List[str]:
        folders = {}
        for rows in self._lists.values():
            for name, label in rows:
                folders.setdefault(label, name.split("/")[0])
        if sorted(folders) != list(range(len(folders))):
            raise ValueError(f"{self.dataset_dir}: labels {sorted(set(range(max(folders) + 1)) - set(folders))} "
                             f"have no image in train_list.mat or test_list.mat")
        return [folders[k] for k in range(len(folders))]

    def read_splits(self):
        splits = []
        for split in ("train", "test"):
            samples, boxes = [], []
            for name, label in self._lists[split]:
                samples.append((os.path.join(self.dataset_dir, "Images", name + ".jpg"), label))
                if self.bbox_crop:
                    boxes.append(union_of_boxes(os.path.join(self.dataset_dir, "Annotation", name)))
            splits.append((samples, boxes if self.bbox_crop else None))
        return splits[0], None, splits[1]
