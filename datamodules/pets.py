"""Oxford-IIIT Pet (Parkhi, Vedaldi, Zisserman, Jawahar, "Cats and dogs", CVPR 2012): 7,349 images of 37 breeds
(12 cats, 25 dogs); trainval 3,680 / test 3,669.

``images.tar.gz`` unpacks to ``images/<Breed_Name>_<n>.jpg`` and ``annotations.tar.gz`` to ``annotations/`` with
``trainval.txt`` and ``test.txt``: space-separated ``<image id> <class id 1..37> <species> <breed id>``, no header
(``list.txt`` has the same columns after six ``#`` lines). Labels are ``class id − 1``; the class name is the image
id without its trailing ``_<n>`` (``Abyssinian``, ``american_bulldog``), in class-id order, read from both split
files. torchvision instead title-cases the names (``American Bulldog``) and builds them from the chosen split
only. Samples come from the list files, never from a glob (the archive has stray files in ``images/``).
"""
from __future__ import annotations

import os
from functools import cached_property
from typing import Dict, List, Tuple

from datamodules.annotated import AnnotatedDataModule, read_fields


class OxfordIIITPetDataModule(AnnotatedDataModule):
    """Args: ``root`` (``oxford-iiit-pet/``, its parent, or ``images/``/``annotations/``), ``val_fraction``,
    ``seed`` and the loader/transform settings of :class:`~datamodules.base.FineGrainedDataModule`."""

    dataset_name = "Oxford-IIIT Pet"
    dataset_id = "pets"
    markers = ("annotations/trainval.txt", "annotations/test.txt", "images")
    candidates = (".", "oxford-iiit-pet")

    def __init__(self, root: str, val_fraction: float = 0.0, seed: int = 0, **kwargs):
        super().__init__(root, bbox_crop=False, val_fraction=val_fraction, seed=seed, **kwargs)
        self.save_hyperparameters()

    @cached_property
    def _rows(self) -> Dict[str, List[Tuple[str, int]]]:
        """``{split: [(image id, label), ...]}`` of ``trainval.txt`` and ``test.txt``."""
        return {split: self._read_rows(split) for split in ("trainval", "test")}

    def _read_rows(self, split: str) -> List[Tuple[str, int]]:
        path = os.path.join(self.dataset_dir, "annotations", f"{split}.txt")
        rows = []
        for number, (image_id, class_id, _, _) in read_fields(path, 4, "'<image id> <class id> <species> <breed id>'"):
            if image_id.startswith("#"):
                continue
            if not class_id.isdigit() or not 1 <= int(class_id) <= 37:
                raise ValueError(f"{path}, line {number}: class id {class_id!r}, expected 1..37")
            rows.append((image_id, int(class_id) - 1))
        return rows

    @cached_property
    def class_names(self) -> List[str]:
        names: Dict[int, str] = {}
        for rows in self._rows.values():
            for image_id, label in rows:
                names.setdefault(label, image_id.rsplit("_", 1)[0])
        missing = sorted(set(range(max(names) + 1)) - set(names))
        if missing:
            raise ValueError(f"{self.dataset_dir}/annotations: class ids {[m + 1 for m in missing]} have no image")
        return [names[k] for k in range(len(names))]

    def read_splits(self):
        images = os.path.join(self.dataset_dir, "images")
        train, test = ([(os.path.join(images, f"{image_id}.jpg"), label) for image_id, label in self._rows[split]]
                       for split in ("trainval", "test"))
        return (train, None), None, (test, None)
