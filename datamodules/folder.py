"""Your own data: one folder per class, ``root/{train,val,test}/<class>/<image>``.

Classes are the sorted folder names of ``root/train`` (as torchvision's ImageFolder), and the images of a
class are every image file below its folder in torchvision's order (folders by path, files by name).
``val`` may also be spelled ``valid``/``validation``; without it, a stratified
``val_fraction`` of train is held out (scikit-learn, fixed seed), and with ``val_fraction`` 0 the test split
serves as validation (the published protocol). Without ``test``, the validation set doubles as the test set and a
warning says so. Which split validates is logged.

Symbolic links are followed within the dataset root. A folder link that leads back into a folder already
walked (a loop, or a second way to the same images) is an error naming the link; so is a link whose target lies
outside the root, unless ``follow_external_links`` is set.
"""
from __future__ import annotations

import logging
import os
from functools import cached_property
from typing import Dict, List, Optional, Sequence, Tuple

from datamodules.base import FineGrainedDataModule
from datamodules.datasets import ImageListDataset
from datamodules.io import IMAGE_EXTENSIONS
from datamodules.splits import stratified_holdout

log = logging.getLogger(__name__)

_SPLIT_NAMES = {"train": ("train", "training"), "val": ("val", "valid", "validation"),
                "test": ("test", "testing")}


def _inside(path: str, folders: Sequence[str]) -> bool:
    return any(os.path.commonpath([path, folder]) == folder for folder in folders)


def walk_class_folder(folder: str, roots: Sequence[str], follow_external_links: bool,
                      walked: Dict[str, Tuple[str, Optional[str]]]) -> List[str]:
    """Every file below ``folder`` (links followed), in the order of torchvision's ``make_dataset``: folders sorted
    by path, the files of each sorted by name.

    ``roots``: real paths that links may lead into (unless ``follow_external_links``). ``walked``: real path of
    every folder walked so far in this split -> (the path it was walked as, the link that led there or None);
    a folder reached a second time is an error naming the link, since following it would read images twice
    (and, for a link to a folder above it, forever).
    """
    def link_target(path: str) -> str:
        target = os.path.realpath(path)
        if not follow_external_links and not _inside(target, roots):
            raise ValueError(f"{path}: symbolic link to {target}, outside the dataset root {roots[0]}; expected "
                             f"links that stay inside it (follow_external_links: true follows links to images "
                             f"elsewhere)")
        return target

    listing: List[Tuple[str, List[str]]] = []
    via = folder if os.path.islink(folder) else None
    pending = [(folder, link_target(folder) if via else os.path.realpath(folder), via)]
    while pending:
        path, real, via = pending.pop()
        if real in walked:
            first, first_via = walked[real]
            link, other = (via, first) if via else (first_via, path) if first_via else (path, first)
            raise ValueError(f"{link}: symbolic link leads into {real}, which the walk also reaches as {other}; "
                             f"expected every folder once and no link loops (remove the link)")
        walked[real] = (path, via)
        files = []
        for entry in os.scandir(path):
            if not entry.is_symlink():
                if entry.is_dir():
                    pending.append((entry.path, os.path.join(real, entry.name), via))
                else:
                    files.append(entry.name)
                continue
            target = link_target(entry.path)
            if not entry.is_dir():  # a link to a file, or a broken link (reported when its image is read)
                files.append(entry.name)
                continue
            again = next((w for w in walked if _inside(w, [target])), None)
            if again is not None:
                raise ValueError(f"{entry.path}: symbolic link to {target} leads into {again}, a folder already "
                                 f"walked; expected every folder once and no link loops (remove the link)")
            pending.append((entry.path, target, entry.path))
        listing.append((path, sorted(files)))
    return [os.path.join(path, name) for path, files in sorted(listing) for name in files]


class ImageFolderDataModule(FineGrainedDataModule):
    """Args:
        root: folder holding ``train/`` (and optionally ``val/`` and ``test/``).
        val_fraction: share of train held out for validation when there is no val folder (0: the test split
            validates).
        seed: seed of that split.
        follow_external_links: follow symbolic links (to images or folders) whose target lies outside ``root``, as
            in a subset built from links to images kept elsewhere. Off (default): such a link is an error naming
            it and its target. Links inside ``root`` are always followed; link loops are always an error.
        exif_transpose: turn every image upright by its EXIF orientation (``PIL.ImageOps.exif_transpose``), for
            photos from cameras and phones. Recorded in ``preprocessing``, so exports and ``predict-images``
            decode the same way. Off (default): the stored pixels, as the benchmark datasets are read.
        **kwargs: loader and transform settings of :class:`FineGrainedDataModule`.
    """

    dataset_name = "image folder"
    dataset_id = "folder"

    def __init__(self, root: str, val_fraction: float = 0.1, seed: int = 0, follow_external_links: bool = False,
                 exif_transpose: bool = False, **kwargs):
        super().__init__(**kwargs)
        self.save_hyperparameters()
        self.root = os.path.expanduser(root)
        self.val_fraction = val_fraction
        self.seed = seed
        self.follow_external_links = follow_external_links
        self.preprocessing["exif_transpose"] = bool(exif_transpose)

    def _split_dir(self, split: str):
        for name in _SPLIT_NAMES[split]:
            path = os.path.join(self.root, name)
            if os.path.isdir(path):
                return path
        return None

    @cached_property
    def class_names(self) -> List[str]:
        if not os.path.isdir(self.root):
            raise FileNotFoundError(f"dataset root {self.root!r} does not exist; expected a folder with "
                                    f"train/<class>/<image> (and optionally val/ and test/)")
        train_dir = self._split_dir("train")
        if train_dir is None:
            raise FileNotFoundError(f"{self.root!r} has no train/ folder; expected "
                                    f"{self.root}/train/<class>/<image>")
        classes = sorted(e.name for e in os.scandir(train_dir) if e.is_dir())
        if not classes:
            raise FileNotFoundError(f"{train_dir!r} has no class folders; expected {train_dir}/<class>/<image>")
        return classes

    def _samples(self, split_dir: str):
        index = {name: i for i, name in enumerate(self.class_names)}
        entries = list(os.scandir(split_dir))
        extra = sorted(set(e.name for e in entries if e.is_dir()) - set(index))
        if extra:
            raise ValueError(f"{split_dir!r} has class folders not in train/: {extra}")
        others = [e.path for e in entries
                  if e.is_file() and not e.name.lower().endswith(IMAGE_EXTENSIONS) and not e.name.startswith(".")]

        def is_image(path: str) -> bool:  # the walk also collects what is not an image
            if path.lower().endswith(IMAGE_EXTENSIONS):
                return True
            if not os.path.basename(path).startswith("."):
                others.append(path)
            return False

        roots = list(dict.fromkeys([os.path.realpath(self.root), os.path.realpath(split_dir)]))
        walked: Dict[str, Tuple[str, Optional[str]]] = {}
        samples = [(path, label) for name, label in sorted(index.items())
                   if os.path.isdir(os.path.join(split_dir, name))
                   for path in walk_class_folder(os.path.join(split_dir, name), roots, self.follow_external_links,
                                                 walked)
                   if is_image(path)]
        labels = {label for _, label in samples}
        empty = sorted(c for c, k in index.items() if k not in labels)
        if empty and os.path.basename(split_dir) == "train":
            raise ValueError(f"{split_dir!r}: class folder(s) {empty} hold no images; expected files ending in "
                             f"{', '.join(IMAGE_EXTENSIONS)} (remove the folder or add its images)")
        if others:
            log.warning("%s: ignoring %d file(s) that are not images (%s%s)", split_dir, len(others),
                        ", ".join(others[:3]), ", ..." if len(others) > 3 else "")
        return samples

    @property
    def validation_is_test(self) -> bool:
        # No test/ folder: the validation split tests too; else the test split validates unless val/ or a hold-out.
        no_val = self._split_dir("val") is None and self.val_fraction <= 0
        return self._split_dir("test") is None or no_val

    def build_datasets(self) -> Tuple[ImageListDataset, ImageListDataset, ImageListDataset]:
        classes = self.class_names
        train_dir = self._split_dir("train")
        train = self._samples(train_dir)
        val_dir, test_dir = self._split_dir("val"), self._split_dir("test")
        test = self._samples(test_dir) if test_dir is not None else None
        if val_dir is not None:
            val = self._samples(val_dir)
            log.info("%s: validation on %s (%d images)", self.root, val_dir, len(val))
        elif self.val_fraction > 0:
            train, val, _, _ = stratified_holdout(train, [label for _, label in train], classes,
                                                  self.val_fraction, self.seed, repr(train_dir))
            log.info("%s: validation on %d images held out from %s (stratified, val_fraction %g, seed %d); %d "
                     "train", self.root, len(val), train_dir, self.val_fraction, self.seed, len(train))
        elif test is not None:
            val = test
            log.info("%s: the test split (%s) serves as validation set (val_fraction 0, no val/ folder); the "
                     "reported model is then the last epoch", self.root, test_dir)
        else:
            raise ValueError(f"{self.root}: no val/ and no test/ folder, and val_fraction 0 holds nothing out: "
                             f"expected a val/ or test/ folder, or val_fraction > 0")
        if test is None:
            log.warning("%s has no test/ folder: the validation split is used as test set", self.root)
            test = val
        # Large JPEGs are draft-decoded, as in every loader.
        decode = dict(resize=self.preprocessing["resize"], exif_transpose=self.preprocessing["exif_transpose"])
        val_dataset = ImageListDataset(val, classes, self.eval_transform, **decode)
        test_dataset = val_dataset if test is val else ImageListDataset(test, classes, self.eval_transform, **decode)
        return ImageListDataset(train, classes, self.train_transform, **decode), val_dataset, test_dataset
