"""iNaturalist (Van Horn et al., "The iNaturalist species classification and detection dataset", CVPR 2018;
competitions 2017, 2018 and 2021, visipedia/inat_comp).

Every version ships COCO-like JSON files (``images``: id, file_name; ``annotations``: image_id, category_id;
``categories``: id, name, …) beside the image folders, and ``file_name`` is the path from the dataset folder
(``train_val_images/Aves/…`` in 2017, ``train_val2018/Plantae/7477/…`` in 2018, ``train_mini/02912_…/….jpg`` in
2021). Labels are the JSON's ``category_id`` (0-based): not the order of the image folders, which torchvision's
reader uses. Validation is the official val JSON and is what the papers report; the test JSONs have no labels,
so the test split is the validation split and the test images are predict-only (``predict_dataloader``).

==========  ==================================  ==================  =======================
version     train JSON                          val JSON            test JSON (no labels)
==========  ==================================  ==================  =======================
2017        train2017.json                      val2017.json        test2017.json
2018        train2018.json                      val2018.json        test2018.json
2021        train.json                          val.json            public_test.json
2021_mini   train_mini.json                     val.json            public_test.json
==========  ==================================  ==================  =======================
"""
from __future__ import annotations

import json
import os
from functools import cached_property
from typing import Dict, List, Tuple

from torch.utils.data import DataLoader

from datamodules.annotated import AnnotatedDataModule
from datamodules.datasets import ImageListDataset

FILES = {"2017": ("train2017.json", "val2017.json", "test2017.json"),
         "2018": ("train2018.json", "val2018.json", "test2018.json"),
         "2021": ("train.json", "val.json", "public_test.json"),
         "2021_mini": ("train_mini.json", "val.json", "public_test.json")}
UNLABELLED = -1  # the label of predict-only test images


def read_json(path: str, keys: List[str]) -> dict:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"annotation file not found: {path} (expected iNaturalist JSON with {', '.join(keys)})")
    try:
        with open(path, encoding="utf-8") as f:
            content = json.load(f)
    except ValueError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from err
    missing = [k for k in keys if k not in content]
    if missing:
        raise ValueError(f"{path}: no {', '.join(missing)} (expected keys {', '.join(keys)})")
    return content


class INaturalistDataModule(AnnotatedDataModule):
    """Args: ``root`` (the folder with the JSON files and image folders, or its parent ``inat<version>/``),
    ``version`` (``"2017"``, ``"2018"``, ``"2021"``, ``"2021_mini"``), ``val_fraction`` (> 0 holds out part of train
    for model selection instead of the official val), ``seed`` and the loader/transform settings of
    :class:`~datamodules.base.FineGrainedDataModule`."""

    def __init__(self, root: str, version: str = "2021_mini", val_fraction: float = 0.0, seed: int = 0, **kwargs):
        if version not in FILES:
            raise ValueError(f"version must be one of {sorted(FILES)}, got {version!r}")
        super().__init__(root, bbox_crop=False, val_fraction=val_fraction, seed=seed, **kwargs)
        self.version = version
        self.dataset_name = f"iNaturalist {version}"
        self.dataset_id = f"inaturalist_{version}"
        self.markers = FILES[version][:2]  # the train and val JSON files
        self.candidates = (".", f"inat{version}", f"inaturalist{version}", version)
        self.save_hyperparameters()

    @cached_property
    def _categories(self) -> List[Tuple[int, str]]:
        # Every JSON of a version lists all its categories: read them from the val file, so that the train file
        # (gigabytes for 2021) is parsed once, in read_splits.
        path = os.path.join(self.dataset_dir, FILES[self.version][1])
        return sorted((int(c["id"]), str(c.get("name", c["id"]))) for c in read_json(path, ["categories"])["categories"])

    @property
    def class_names(self) -> List[str]:
        """Category names in ``category_id`` order."""
        return [name for _, name in self._categories]

    def _split(self, filename: str, labelled: bool = True) -> List[Tuple[str, int]]:
        path = os.path.join(self.dataset_dir, filename)
        content = read_json(path, ["images", "annotations"] if labelled else ["images"])
        label_of: Dict[int, int] = {cid: k for k, (cid, _) in enumerate(self._categories)}
        category_of: Dict[int, int] = {}
        for number, annotation in enumerate(content.get("annotations", []), start=1):
            category = annotation.get("category_id")
            if category not in label_of:
                raise ValueError(f"{path}: annotation {number} has category_id {category!r}, not a category of "
                                 f"{FILES[self.version][1]}")
            category_of.setdefault(annotation["image_id"], label_of[category])
        samples = []
        for image in content["images"]:
            if labelled and image["id"] not in category_of:
                raise ValueError(f"{path}: image {image['id']} ({image.get('file_name')}) has no annotation")
            samples.append((os.path.join(self.dataset_dir, image["file_name"]),
                            category_of.get(image["id"], UNLABELLED)))
        return samples

    def read_splits(self):
        train, val, _ = FILES[self.version]
        validation = (self._split(val), None)
        return (self._split(train), None), (None if self.val_fraction > 0 else validation), validation

    def predict_dataloader(self) -> DataLoader:
        """The unlabelled test images (label −1), when the test JSON is present; else the validation images."""
        path = os.path.join(self.dataset_dir, FILES[self.version][2])
        if not os.path.isfile(path):
            return super().predict_dataloader()
        dataset = ImageListDataset(self._split(FILES[self.version][2], labelled=False), self.class_names,
                                   self.eval_transform, resize=self.preprocessing["resize"])
        return self._loader(dataset, shuffle=False)
