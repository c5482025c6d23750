"""NABirds (Van Horn et al., "Building a bird recognition app and large scale dataset with citizen scientists",
CVPR 2015): 48,562 images of 555 North American bird categories.

``nabirds.tar.gz`` unpacks to ``nabirds/`` with ``images/<class id, 4 digits>/<hex id>.jpg`` and whitespace-
separated files without header: ``images.txt`` (image id, path under ``images/``), ``image_class_labels.txt``
(image id, class id), ``train_test_split.txt`` (image id, 1 = train / 0 = test), ``classes.txt`` (class id, name
with spaces; every node of the taxonomy, not only the leaves) and ``bounding_boxes.txt`` (image id, x, y, width,
height in pixels). Labels: the 555 leaf class ids used in ``image_class_labels.txt``, in ascending numeric order
(they are not contiguous; a set's iteration order is not an order).
"""
from __future__ import annotations

import os
from functools import cached_property
from typing import Dict, List

from datamodules.annotated import AnnotatedDataModule, image_list_splits, read_fields, read_id_map


class NABirdsDataModule(AnnotatedDataModule):
    """Args: ``root`` (``nabirds/``, its parent, or a folder inside it), ``bbox_crop``, ``val_fraction``, ``seed``
    and the loader/transform settings of :class:`~datamodules.base.FineGrainedDataModule`."""

    dataset_name = "NABirds"
    dataset_id = "nabirds"
    markers = ("images.txt", "image_class_labels.txt", "train_test_split.txt")
    candidates = (".", "nabirds")

    def __init__(self, root: str, bbox_crop: bool = False, val_fraction: float = 0.0, seed: int = 0, **kwargs):
        super().__init__(root, bbox_crop=bbox_crop, val_fraction=val_fraction, seed=seed, **kwargs)
        self.save_hyperparameters()

    @cached_property
    def _labels(self) -> Dict[str, int]:
        """``{image id: class id}`` of ``image_class_labels.txt``."""
        path = os.path.join(self.dataset_dir, "image_class_labels.txt")
        labels = {}
        for image_id, (class_id,) in read_id_map(path, 2, "'<image_id> <class_id>'").items():
            if not class_id.isdigit():
                raise ValueError(f"{path}: image {image_id} has class id {class_id!r}, expected a number")
            labels[image_id] = int(class_id)
        return labels

    @cached_property
    def leaf_ids(self) -> List[int]:
        """The class ids images use, ascending: label k is ``leaf_ids[k]``."""
        return sorted(set(self._labels.values()))

    @property
    def class_names(self) -> List[str]:
        path = os.path.join(self.dataset_dir, "classes.txt")
        names = {int(class_id): name for _, (class_id, name) in read_fields(path, 2, "'<class_id> <name>'")}
        missing = [c for c in self.leaf_ids if c not in names]
        if missing:
            raise ValueError(f"{path}: no name for class ids {missing[:5]} used in image_class_labels.txt")
        return [names[c] for c in self.leaf_ids]

    def read_splits(self):
        label_of = {class_id: k for k, class_id in enumerate(self.leaf_ids)}
        labels = {image_id: label_of[class_id] for image_id, class_id in self._labels.items()}
        train, test = image_list_splits(self.dataset_dir, labels, self.bbox_crop)
        return train, None, test
