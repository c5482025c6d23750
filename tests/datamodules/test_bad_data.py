"""Bad data: a missing root, a wrong layout, damaged or unusual images and bad annotation files, each named."""
import logging
import os
import re

import pytest
from PIL import Image

from datamodules import CSVDataModule, CUB200DataModule, FGVCAircraftDataModule, ImageFolderDataModule
from datamodules.io import ImageLoadError, load_rgb
from tests.conftest import make_image_folder
from tests.replicas import write_aircraft, write_cub


def test_missing_root_names_it(tmp_path):
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "nope")) + ".*does not exist"):
        CUB200DataModule(str(tmp_path / "nope")).class_names


def test_wrong_layout_says_what_was_expected(tmp_path):
    (tmp_path / "photos" / "misc").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match=r"CUB-200-2011 not found .*expected images\.txt, classes\.txt"):
        CUB200DataModule(str(tmp_path / "photos")).class_names


def test_missing_annotation_file_is_named(tmp_path):
    data = write_aircraft(str(tmp_path), placeholder=True)
    os.remove(os.path.join(data, "images_variant_test.txt"))
    dm = FGVCAircraftDataModule(str(tmp_path), num_workers=0)
    with pytest.raises(FileNotFoundError, match="images_variant_test.txt"):
        dm.setup()


def _cub_with(tmp_path, damage):
    base = write_cub(str(tmp_path), n_classes=2, per_class=2)
    path = os.path.join(base, "images", "001.Bird_kind_1", "Bird_Kind_1_0000_1.jpg")
    damage(path)
    dm = CUB200DataModule(str(tmp_path), num_workers=0, resize_size=32, crop_size=32)
    dm.setup()
    return dm, path


@pytest.mark.parametrize("case,damage,message", [
    ("04 list entry for a missing image", os.remove, "image file not found"),
    ("05 corrupt JPEG", lambda p: open(p, "wb").write(b"\xff\xd8\xff\xe0 not really a jpeg"), "corrupt|cannot"),
    ("06 truncated JPEG", lambda p: open(p, "r+b").truncate(200), "truncated"),
    ("07 0-byte file", lambda p: open(p, "wb").close(), "0 bytes"),
])
def test_bad_image_names_the_file_or_is_skipped(tmp_path, caplog, case, damage, message):
    dm, path = _cub_with(tmp_path, damage)
    index = [p for p, _ in dm.train_dataset.samples].index(path)
    with pytest.raises(ImageLoadError) as err:
        dm.train_dataset[index]
    assert path in str(err.value) and re.search(message, str(err.value), re.IGNORECASE), str(err.value)
    # skip_corrupt: a logged skip, the next readable image takes its place.
    dm2 = CUB200DataModule(str(tmp_path), num_workers=0, resize_size=32, crop_size=32, skip_corrupt=True)
    dm2.setup()
    with caplog.at_level(logging.WARNING):
        image, label = dm2.train_dataset[index]
    assert image.shape == (3, 32, 32)
    assert label == dm2.train_dataset.samples[(index + 1) % len(dm2.train_dataset)][1]
    assert path in caplog.text and "skip_corrupt" in caplog.text
    assert path in dm2.train_dataset.skipped


def test_cmyk_grayscale_rgba_palette_are_converted(tmp_path):
    for mode, ext in (("CMYK", "jpg"), ("L", "jpg"), ("RGBA", "png"), ("P", "png"), ("LA", "png"), ("I;16", "png")):
        path = tmp_path / f"img.{mode.replace(';', '')}.{ext}"
        Image.new(mode, (9, 7)).save(path)
        image = load_rgb(path)
        assert image.mode == "RGB" and image.size == (9, 7)


def test_non_image_file_in_a_class_folder_is_logged_and_ignored(tmp_path, caplog):
    root = make_image_folder(tmp_path / "f", n_classes=2, per_class=3)
    (tmp_path / "f" / "train" / "class_0" / "notes.txt").write_text("not an image")
    dm = ImageFolderDataModule(root, num_workers=0, val_fraction=0.34)
    with caplog.at_level(logging.WARNING):
        dm.setup()
    assert "notes.txt" in caplog.text and "not images" in caplog.text
    assert all(not p.endswith(".txt") for p, _ in dm.train_dataset.samples + dm.val_dataset.samples)


def test_empty_class_folder_is_an_error_naming_it(tmp_path):
    root = make_image_folder(tmp_path / "f", n_classes=2, per_class=3)
    (tmp_path / "f" / "train" / "class_9").mkdir()
    with pytest.raises(ValueError, match=r"\['class_9'\] hold no images"):
        ImageFolderDataModule(root, num_workers=0).setup()


def test_label_out_of_range_names_file_and_value(tmp_path):
    base = write_cub(str(tmp_path), n_classes=2, per_class=2, placeholder=True)
    with open(os.path.join(base, "image_class_labels.txt"), "w") as f:
        f.write("1 1\n2 7\n3 2\n4 2\n")
    with pytest.raises(ValueError, match=r"image_class_labels.txt: image 2 has class id 7, not in classes.txt \(1..2\)"):
        CUB200DataModule(str(tmp_path), num_workers=0).setup()
    (tmp_path / "img").mkdir()
    (tmp_path / "train.csv").write_text("a.jpg,5\n")
    (tmp_path / "test.csv").write_text("a.jpg,0\n")
    dm = CSVDataModule(str(tmp_path / "img"), str(tmp_path / "train.csv"), str(tmp_path / "test.csv"),
                       class_names=["cat", "dog"])
    with pytest.raises(ValueError, match=r"train.csv, line 1.*5"):
        dm.setup()


def test_duplicate_image_id_names_file_and_line(tmp_path):
    base = write_cub(str(tmp_path), n_classes=2, per_class=2, placeholder=True)
    path = os.path.join(base, "images.txt")
    lines = open(path).read().splitlines()
    open(path, "w").write("\n".join(lines + [lines[0]]) + "\n")
    with pytest.raises(ValueError, match=r"images.txt, line 5: duplicate id '1'"):
        CUB200DataModule(str(tmp_path), num_workers=0).setup()


def test_csv_path_escaping_the_root(tmp_path):
    (tmp_path / "img").mkdir()
    (tmp_path / "train.csv").write_text("../../etc/passwd,cat\n")
    (tmp_path / "test.csv").write_text("x.jpg,cat\n")
    dm = CSVDataModule(str(tmp_path / "img"), str(tmp_path / "train.csv"), str(tmp_path / "test.csv"))
    with pytest.raises(ValueError, match=r"train.csv, line 1: path '\.\./\.\./etc/passwd' resolves outside"):
        dm.setup()
