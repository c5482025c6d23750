"""CUB-200-2011 (Wah, Branson, Welinder, Perona, Belongie, Caltech technical report CNS-TR-2011-001).

11,788 images of 200 bird species: 5,994 train, 5,794 test. Files (single-space separated, 1-based
ids): ``images.txt`` (id, relative path), ``image_class_labels.txt`` (id, class id),
``train_test_split.txt`` (id, 1 = train), ``classes.txt`` (class id, ``NNN.Name``) and
``bounding_boxes.txt`` (id, x, y, width, height as floats). Labels are 0-based in ``classes.txt`` order.

The published input (the iSQRT-COV fine-tuning code, fast-MPN-COV ``imagepreprocess.py``: shorter side to 448,
centre crop 448 in training and at test, random horizontal flip in training) is set by the recipes
(``recipes/_base/data/cub.yaml``), as for every dataset; the constructor's defaults are the shared ones of
:class:`~datamodules.base.FineGrainedDataModule`.
"""
from __future__ import annotations

import os
from functools import cached_property
from typing import List

from datamodules.annotated import AnnotatedDataModule, image_list_splits, read_fields, read_id_map


class CUB200DataModule(AnnotatedDataModule):
    dataset_name = "CUB-200-2011"
    dataset_id = "cub"  # the key of results/reference.csv and the run records
    markers = ("images.txt", "classes.txt")
    candidates = (".", "CUB_200_2011", "CUB_200_2011/CUB_200_2011")  # some copies nest the folder twice

    def __init__(self, root: str, bbox_crop: bool = False, val_fraction: float = 0.0, seed: int = 0, **kwargs):
        super().__init__(root, bbox_crop=bbox_crop, val_fraction=val_fraction, seed=seed, **kwargs)
        self.save_hyperparameters()

    @cached_property
    def _classes(self) -> List[List[str]]:
        """``[class_id, NNN.Name]`` rows of ``classes.txt``, in its order."""
        path = os.path.join(self.dataset_dir, "classes.txt")
        return [fields for _, fields in read_fields(path, 2, "'<class_id> <NNN.Name>'")]

    @property
    def class_names(self) -> List[str]:
        """``NNN.Name`` as in ``classes.txt``, in its order."""
        return [name for _, name in self._classes]

    @property
    def short_class_names(self) -> List[str]:
        """Names without the ``NNN.`` prefix, e.g. ``Black_footed_Albatross``."""
        return [name.split(".", 1)[1] if "." in name else name for name in self.class_names]

    def read_splits(self):
        d = self.dataset_dir
        label_of_class = {cid: i for i, (cid, _) in enumerate(self._classes)}
        path = os.path.join(d, "image_class_labels.txt")
        labels = {}
        for image_id, (class_id,) in read_id_map(path, 2, "'<image_id> <class_id>'").items():
            if class_id not in label_of_class:
                raise ValueError(f"{path}: image {image_id} has class id {class_id}, not in classes.txt "
                                 f"(1..{len(label_of_class)})")
            labels[image_id] = label_of_class[class_id]
        train, test = image_list_splits(d, labels, self.bbox_crop)
        return train, None, test
