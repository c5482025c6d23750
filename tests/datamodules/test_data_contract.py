"""The DataModule contract (finegrained.data_contract): every DataModule of the project declares it, and knows
whether its validation runs on the test split from its settings and layout, without reading the splits."""
import inspect

import pytest

import datamodules
from datamodules.base import FineGrainedDataModule
from finegrained.data_contract import CONTRACT, follows_contract, require_fine_grained_data
from tests.conftest import make_image_folder
from tests.replicas import write_aircraft, write_cub, write_flowers, write_inaturalist

PROJECT_DATAMODULES = [getattr(datamodules, name) for name in datamodules.__all__
                       if inspect.isclass(getattr(datamodules, name))
                       and issubclass(getattr(datamodules, name), FineGrainedDataModule)
                       and getattr(datamodules, name) is not FineGrainedDataModule]


@pytest.mark.parametrize("cls", PROJECT_DATAMODULES, ids=lambda c: c.__name__)
def test_every_datamodule_says_whether_validation_is_the_test_split_itself(cls):
    # Inherited from FineGrainedDataModule would mean: build the splits to find out.
    owner = next(k for k in cls.__mro__ if "validation_is_test" in vars(k))
    assert owner is not FineGrainedDataModule, f"{cls.__name__} relies on the fallback that reads the splits"
    assert all(inspect.getattr_static(cls, name, None) is not None or name in ("skip_corrupt", "preprocessing")
               for name in CONTRACT)


def _cases(root):
    cub, aircraft = write_cub(str(root / "cub"), n_classes=3, per_class=4), write_aircraft(str(root / "air"),
                                                                                           n_images=9)
    flowers, inat = write_flowers(str(root / "flowers")), write_inaturalist(str(root / "inat"), per_class=2)
    both = make_image_folder(root / "both", splits=("train", "val", "test"), per_class=2)
    no_val = make_image_folder(root / "no_val", splits=("train", "test"), per_class=3)
    no_test = make_image_folder(root / "no_test", splits=("train", "val"), per_class=2)
    small = dict(batch_size=2, num_workers=0, resize_size=40, crop_size=32)
    return [
        (datamodules.CUB200DataModule(cub, **small), True),
        (datamodules.CUB200DataModule(cub, val_fraction=0.5, **small), False),
        (datamodules.FGVCAircraftDataModule(aircraft, **small), True),
        (datamodules.FGVCAircraftDataModule(aircraft, train_split="train", **small), False),
        (datamodules.Flowers102DataModule(flowers, **small), True),
        (datamodules.Flowers102DataModule(flowers, train_split="train", **small), False),
        (datamodules.INaturalistDataModule(inat, **small), True),
        (datamodules.ImageFolderDataModule(both, val_fraction=0, **small), False),
        (datamodules.ImageFolderDataModule(no_val, val_fraction=0, **small), True),
        (datamodules.ImageFolderDataModule(no_val, val_fraction=0.34, **small), False),
        (datamodules.ImageFolderDataModule(no_test, val_fraction=0, **small), True),
    ]


def test_validation_is_test_needs_no_split_and_agrees_with_the_splits(tmp_path):
    for datamodule, expected in _cases(tmp_path):
        assert follows_contract(datamodule)
        assert datamodule.validation_is_test is expected, type(datamodule).__name__
        assert datamodule.train_dataset is None, "validation_is_test read the splits"
        datamodule.setup("fit")
        assert (datamodule.val_dataset is datamodule.test_dataset) is expected, type(datamodule).__name__


def test_skip_corrupt_reaches_every_split(tmp_path):
    folder = make_image_folder(tmp_path / "f", per_class=2)
    datamodule = datamodules.ImageFolderDataModule(folder, val_fraction=0.5, skip_corrupt=True, batch_size=2,
                                                   num_workers=0, resize_size=40, crop_size=32)
    datamodule.setup("fit")
    assert all(d.skip_corrupt for d in (datamodule.train_dataset, datamodule.val_dataset, datamodule.test_dataset))


def test_a_datamodule_outside_the_contract_gets_one_clear_error():
    import pytorch_lightning as pl

    assert not follows_contract(pl.LightningDataModule())
    with pytest.raises(ValueError, match="the SVM test .* needs a finegrained DataModule"):
        require_fine_grained_data(pl.LightningDataModule(), "the SVM test (--svm)")
