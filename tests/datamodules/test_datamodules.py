"""DataModules: ImageFolder splits and errors, Fashion-MNIST from Debian's idx files."""
import collections
import os

import pytest
import torch

from datamodules import FashionMNISTDataModule, ImageFolderDataModule, ImageLoadError, load_rgb
from datamodules import fashion_mnist
from tests.conftest import make_image_folder, write_image
from tests.conftest import REPO_ROOT


def test_image_folder_without_val_makes_stratified_split(image_folder):
    dm = ImageFolderDataModule(image_folder, val_fraction=0.5, batch_size=4, num_workers=0,
                               resize_size=40, crop_size=32)
    assert dm.class_names == ["class_0", "class_1", "class_2"] and dm.num_classes == 3
    dm.setup()
    assert len(dm.train_dataset) == 9 and len(dm.val_dataset) == 9 and len(dm.test_dataset) == 18
    assert collections.Counter(dm.val_dataset.targets) == {0: 3, 1: 3, 2: 3}
    train_paths = {p for p, _ in dm.train_dataset.samples}
    assert not train_paths & {p for p, _ in dm.val_dataset.samples}
    x, y = dm.train_dataset[0]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and isinstance(y, int)
    images, labels = next(iter(dm.train_dataloader()))
    assert images.shape == (4, 3, 32, 32) and labels.dtype == torch.int64
    # Same seed, same split.
    again = ImageFolderDataModule(image_folder, val_fraction=0.5, num_workers=0)
    again.setup()
    assert again.val_dataset.samples == dm.val_dataset.samples


def test_image_folder_uses_val_folder(tmp_path):
    root = make_image_folder(tmp_path / "d", splits=("train", "val", "test"), per_class=2)
    dm = ImageFolderDataModule(root, num_workers=0)
    dm.setup()
    assert len(dm.train_dataset) == len(dm.val_dataset) == len(dm.test_dataset) == 6
    assert all("/val/" in p for p, _ in dm.val_dataset.samples)


def test_image_folder_errors_name_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ImageFolderDataModule(str(tmp_path / "missing")).class_names
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no train/ folder"):
        ImageFolderDataModule(str(tmp_path / "empty")).class_names


def test_load_rgb_converts_modes_and_names_bad_files(tmp_path):
    from PIL import Image

    for mode in ("L", "CMYK", "RGBA", "P"):
        path = tmp_path / f"img_{mode}.{'jpg' if mode in ('L', 'CMYK') else 'png'}"
        Image.new(mode, (8, 8)).save(path)
        assert load_rgb(path).mode == "RGB"
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    with pytest.raises(ImageLoadError, match="empty.jpg.*0 bytes"):
        load_rgb(empty)
    text = tmp_path / "notes.jpg"
    text.write_text("not an image")
    with pytest.raises(ImageLoadError, match="notes.jpg"):
        load_rgb(text)
    good = write_image(str(tmp_path / "good.jpg"), (10, 20, 30), size=64)
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(open(good, "rb").read()[:300])
    with pytest.raises(ImageLoadError, match="truncated.jpg"):
        load_rgb(truncated)
    with pytest.raises(ImageLoadError, match="missing.jpg"):
        load_rgb(tmp_path / "missing.jpg")


debian = pytest.mark.skipif(
    not os.path.isfile(os.path.join(fashion_mnist.DEBIAN_DIR, "train-images-idx3-ubyte.gz")),
    reason="Debian package dataset-fashion-mnist is not installed (make setup installs it as root)")


@debian
def test_fashion_mnist_subsets_from_debian_files(tmp_path):
    dm = FashionMNISTDataModule(data_dir=str(tmp_path), image_size=64, subset_per_class=5, val_per_class=2,
                                test_per_class=3, num_workers=0)
    assert dm.num_classes == 10 and dm.class_names[0] == "T-shirt/top"
    dm.prepare_data()
    assert os.path.isfile(tmp_path / "FashionMNIST" / "raw" / "train-images-idx3-ubyte")
    dm.setup()
    assert collections.Counter(dm.train_dataset.targets) == {c: 5 for c in range(10)}
    assert collections.Counter(dm.val_dataset.targets) == {c: 2 for c in range(10)}
    assert collections.Counter(dm.test_dataset.targets) == {c: 3 for c in range(10)}
    x, _ = dm.test_dataset[0]
    assert x.shape == (3, 64, 64)
    assert dm.preprocessing["crop"] == 64 and dm.preprocessing["resize"] == 72
    image = dm.test_dataset.load_image(0)
    assert image.mode == "RGB" and image.size == (28, 28)


@debian
def test_fashion_mnist_val_is_disjoint_from_train(tmp_path):
    dm = FashionMNISTDataModule(data_dir=str(tmp_path), subset_per_class=20, val_per_class=20, num_workers=0)
    dm.setup()
    train = {bytes(img) for img in dm.train_dataset.images}
    val = {bytes(img) for img in dm.val_dataset.images}
    assert len(train & val) <= 1  # Fashion-MNIST has a handful of duplicate images; indices never overlap


def test_fashion_mnist_missing_offline_gives_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(fashion_mnist, "DEBIAN_DIR", str(tmp_path / "nowhere"))
    dm = FashionMNISTDataModule(data_dir=str(tmp_path / "cache"), download=False)
    with pytest.raises(FileNotFoundError, match="dataset-fashion-mnist"):
        dm.prepare_data()


def test_the_benchmarks_record_the_ids_of_the_reference_tables():
    """Run records name datasets by these ids, which are the keys of results/reference.csv."""
    import pandas as pd

    import datamodules

    reference = set(pd.read_csv(os.path.join(REPO_ROOT, "results", "reference.csv"))["dataset"])
    assert datamodules.CUB200DataModule.dataset_id == "cub"
    assert datamodules.StanfordCarsDataModule.dataset_id == "cars"
    aircraft = datamodules.FGVCAircraftDataModule.__new__(datamodules.FGVCAircraftDataModule)
    for level, expected in (("variant", "aircraft"), ("family", "aircraft_family")):
        aircraft.annotation_level = level
        assert aircraft.dataset_id == expected
    assert {"cub", "aircraft", "cars"} <= reference
    for name in datamodules.__all__:
        cls = getattr(datamodules, name)
        if isinstance(cls, type) and issubclass(cls, datamodules.FineGrainedDataModule):
            assert isinstance(getattr(cls, "dataset_name", None), (str, property)), name


@pytest.mark.parametrize("splits, val_fraction, says", [
    (("train", "val", "test"), 0.1, "validation on {root}/val (9 images)"),
    (("train", "test"), 0.1, "validation on 3 images held out from {root}/train"),
    (("train", "test"), 0.0, "the test split ({root}/test) serves as validation set"),
])
def test_an_image_folder_says_which_split_validates(tmp_path, caplog, splits, val_fraction, says):
    import logging

    from tests.conftest import make_image_folder

    root = make_image_folder(tmp_path / "f", n_classes=3, per_class=3, splits=splits)
    caplog.set_level(logging.INFO, logger="datamodules")
    dm = ImageFolderDataModule(root, val_fraction=val_fraction, batch_size=2, num_workers=0, resize_size=40,
                               crop_size=32)
    dm.setup()
    assert says.format(root=root) in caplog.text
    assert (dm.val_dataset is dm.test_dataset) == (val_fraction == 0 and "val" not in splits)
    assert len(dm.train_dataset) == (6 if "val" not in splits and val_fraction else 9)


def test_an_image_folder_with_nothing_to_validate_on_is_one_clear_error(tmp_path):
    from tests.conftest import make_image_folder

    root = make_image_folder(tmp_path / "f", n_classes=2, per_class=3, splits=("train",))
    with pytest.raises(ValueError, match="no val/ and no test/ folder, and val_fraction 0 holds nothing out"):
        ImageFolderDataModule(root, val_fraction=0, num_workers=0).setup()
