"""Every DataModule finds its dataset with ``root`` at every folder level a download creates.

The replicas are written as the archives unpack (CUB_200_2011.tgz, fgvc-aircraft-2013b.tar.gz,
torchvision's ``stanford_cars/``, both Kaggle copies of Stanford Cars, ``car_ims.tgz`` with ``cars_annos.mat``); the DataModule is then built with
``root`` at each folder of that tree that does not itself hold images, and must find the same dataset
folder and the same samples.
"""
import os

import pytest

from datamodules import CUB200DataModule, FGVCAircraftDataModule, StanfordCarsDataModule
from datamodules.io import IMAGE_EXTENSIONS
from tests.replicas import write_aircraft, write_cars, write_cub


def _levels(top):
    """Every folder of the unpacked tree that holds no image file directly (class and image folders excluded)."""
    levels = []
    for folder, _, files in os.walk(top):
        if not any(f.lower().endswith(IMAGE_EXTENSIONS) for f in files):
            levels.append(folder)
    return levels


def _cub(top, nested=False):
    base = write_cub(top, n_classes=3, per_class=2, nested=nested)
    open(os.path.join(top, "attributes.txt"), "w").close()  # CUB_200_2011.tgz holds it beside the folder
    return base, CUB200DataModule, {}


def _aircraft(top):
    return write_aircraft(top, n_images=12), FGVCAircraftDataModule, {}


def _cars(top, layout, **kwargs):
    base, _, _ = write_cars(top, layout, n_train=4, n_test=3, **kwargs)
    return base, StanfordCarsDataModule, {"layout": layout}


DOWNLOADS = {
    "CUB_200_2011.tgz": lambda top: _cub(top),
    "CUB nested twice": lambda top: _cub(top, nested=True),
    "fgvc-aircraft-2013b.tar.gz": _aircraft,
    "torchvision stanford_cars/": lambda top: _cars(top, "original"),
    "Kaggle cars_train/cars_train copy": lambda top: _cars(top, "kaggle_nested"),
    "Kaggle car_data class-folder copy": lambda top: _cars(top, "kaggle_folders"),
    "Kaggle class-folder copy, CSVs above car_data": lambda top: _cars(top, "kaggle_folders", csv_above=True),
    "car_ims.tgz beside cars_annos.mat": lambda top: _cars(top, "combined"),
}


@pytest.mark.parametrize("download", list(DOWNLOADS))
def test_root_at_every_level_of_the_download(tmp_path, download):
    top = str(tmp_path / "downloads")
    os.makedirs(top)
    base, module, expected = DOWNLOADS[download](top)
    levels = _levels(top)
    assert top in levels and os.path.normpath(base) in levels and len(levels) >= 2
    reference = None
    for root in levels:
        dm = module(root, num_workers=0)
        assert dm.dataset_dir == os.path.normpath(base), f"root={os.path.relpath(root, top)}"
        for key, value in expected.items():
            assert getattr(dm, key) == value, f"root={os.path.relpath(root, top)}"
        dm.setup()
        samples = (dm.class_names, dm.train_dataset.samples, dm.test_dataset.samples)
        assert len(samples[1]) > 0 and len(samples[2]) > 0
        reference = reference or samples
        assert samples == reference, f"root={os.path.relpath(root, top)}"


def test_a_root_outside_any_download_still_names_what_was_searched(tmp_path):
    (tmp_path / "empty" / "deeper").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="CUB-200-2011 not found under .*deeper.*images.txt"):
        CUB200DataModule(str(tmp_path / "empty" / "deeper")).dataset_dir
