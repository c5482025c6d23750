"""Food-101 (Bossard, Guillaumin, Van Gool, "Food-101 – mining discriminative components with random forests",
ECCV 2014): 101,000 images of 101 dishes, 750 train / 250 test per class, no validation split.

``food-101.tar.gz`` unpacks to ``food-101/`` with ``images/<class>/<id>.jpg`` and ``meta/``: ``classes.txt`` (one
snake_case class per line), ``train.txt`` / ``test.txt`` (``<class>/<id>`` per line, no extension). Labels follow
``meta/classes.txt``. torchvision sorts the classes of ``meta/<split>.json`` instead, which swaps
``cheesecake`` and ``cheese_plate`` (16 and 17 in the official order).
"""
from __future__ import annotations

import os
from functools import cached_property
from typing import List

from datamodules.annotated import AnnotatedDataModule


def read_lines(path: str, what: str) -> List[str]:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"annotation file not found: {path} (expected {what})")
    with open(path, encoding="utf-8") as f:
        return [line.strip() for line in f.read().splitlines() if line.strip()]


class Food101DataModule(AnnotatedDataModule):
    """Args: ``root`` (``food-101/``, its parent, or ``images/``/``meta/``), ``val_fraction``, ``seed`` and the
    loader/transform settings of :class:`~datamodules.base.FineGrainedDataModule`."""

    dataset_name = "Food-101"
    dataset_id = "food101"
    markers = ("meta/classes.txt", "meta/train.txt", "meta/test.txt", "images")
    candidates = (".", "food-101")

    def __init__(self, root: str, val_fraction: float = 0.0, seed: int = 0, **kwargs):
        super().__init__(root, bbox_crop=False, val_fraction=val_fraction, seed=seed, **kwargs)
        self.save_hyperparameters()

    @cached_property
    def class_names(self) -> List[str]:
        return read_lines(os.path.join(self.dataset_dir, "meta", "classes.txt"), "one class name per line")

    def read_splits(self):
        label_of = {name: k for k, name in enumerate(self.class_names)}
        splits = []
        for split in ("train", "test"):
            path = os.path.join(self.dataset_dir, "meta", f"{split}.txt")
            samples = []
            for number, line in enumerate(read_lines(path, "'<class>/<id>' per line"), start=1):
                name = line.split("/", 1)[0]
                if "/" not in line or name not in label_of:
                    raise ValueError(f"{path}, line {number}: {line!r} is not '<class>/<id>' with a class of "
                                     f"meta/classes.txt")
                samples.append((os.path.join(self.dataset_dir, "images", line + ".jpg"), label_of[name]))
            splits.append((samples, None))
        return splits[0], None, splits[1]
