"""Inputs that used to go wrong: DataModule hyper-parameters under LightningCLI, folder links, decompression bombs,
16-bit and EXIF-rotated images, shard outputs and shard samples, class names as folder names."""
import json
import logging
import os
import struct
import tarfile
import zlib

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from datamodules import CSVDataModule, ImageFolderDataModule, ShardDataModule
from datamodules.datasets import ImageListDataset
from datamodules.io import ImageLoadError, decode_rgb, load_rgb
from datamodules.samples import safe_name, safe_names, save_samples
from finegrained.cli import main
from tests.conftest import PALETTE, make_image_folder, tiny_recipe_text, write_image

SMALL = dict(batch_size=2, num_workers=0, resize_size=40, crop_size=32)


def _one_line_error(capsys, argv):
    from finegrained.cli import entry_point

    assert entry_point(argv) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in err, err[-2000:]
    return errors[0]


# ---- CSVDataModule under LightningCLI -----------------------------------------------------------------------------
def _csv_dataset(folder, classes=("cls0", "cls1", "cls2"), per_class=4):
    """folder/img/*.jpg with train.csv and test.csv naming the classes; returns (image root, train, test)."""
    rows = {"train": [], "test": []}
    for split in rows:
        for c, name in enumerate(classes):
            for i in range(per_class):
                file = f"{split}_{c}_{i}.jpg"
                write_image(os.path.join(folder, "img", file), PALETTE[c % len(PALETTE)],
                            seed=zlib.crc32(f"{split}/{c}/{i}".encode()))
                rows[split].append(f"{file},{name}")
    for split, lines in rows.items():
        with open(os.path.join(folder, f"{split}.csv"), "w") as f:
            f.write("\n".join(lines) + "\n")
    return os.path.join(folder, "img"), os.path.join(folder, "train.csv"), os.path.join(folder, "test.csv")


def _csv_recipe(tmp_path, image_root, train_csv, test_csv, **init_args):
    """The tiny recipe with a CSVDataModule as its data."""
    head = tiny_recipe_text(tmp_path / "run", "unused").split("\ndata:\n")[0]
    settings = {"image_root": image_root, "train_csv": train_csv, "test_csv": test_csv, "val_fraction": 0.34,
                "batch_size": 4, "num_workers": 0, "resize_size": 72, "crop_size": 64, **init_args}
    path = tmp_path / "csv.yaml"
    path.write_text(head + "\ndata:\n  class_path: datamodules.CSVDataModule\n  init_args: "
                    + json.dumps(settings) + "\n")
    return str(path)


@pytest.mark.parametrize("class_names,exif_transpose", [(None, True), (["cls0", "cls1", "cls2"], False)])
def test_csv_datamodule_fits_through_the_cli_with_and_without_class_names(tmp_path, class_names, exif_transpose):
    image_root, train_csv, test_csv = _csv_dataset(str(tmp_path / "data"))
    extra = {"exif_transpose": exif_transpose, **({"class_names": class_names} if class_names else {})}
    assert main(["fit", "--config", _csv_recipe(tmp_path, image_root, train_csv, test_csv, **extra)]) == 0
    ckpt = str(tmp_path / "run" / "checkpoints" / "last.ckpt")
    hparams = torch.load(ckpt, weights_only=True)["hyper_parameters"]
    assert hparams["class_names"] == ["cls0", "cls1", "cls2"]  # given, or inferred from train.csv
    assert hparams["preprocessing"]["exif_transpose"] is exif_transpose  # the checkpoint records the decoding


def test_csv_datamodule_records_class_names_only_when_given(tmp_path):
    image_root, train_csv, test_csv = _csv_dataset(str(tmp_path))
    assert "class_names" not in CSVDataModule(image_root, train_csv, test_csv).hparams
    given = CSVDataModule(image_root, train_csv, test_csv, class_names=["cls2", "cls1", "cls0"])
    assert given.hparams["class_names"] == given.class_names == ["cls2", "cls1", "cls0"]


# ---- ImageFolderDataModule and symbolic links ----------------------------------------------------------------------
def test_folder_samples_keep_torchvisions_order(tmp_path):
    from torchvision.datasets.folder import make_dataset

    root = make_image_folder(tmp_path / "d", n_classes=3, per_class=3)
    for sub in ("b", "b-c", "b/x", "B", "b.c", "b/x/y", ".hidden", "b_c"):  # '-' and '.' sort before '/'
        write_image(str(tmp_path / "d" / "train" / "class_1" / sub / "img.png"), PALETTE[1], size=8)
    (tmp_path / "d" / "train" / "class_2" / "inner").mkdir()
    os.symlink("../../class_0/train_000.jpg", tmp_path / "d" / "train" / "class_2" / "inner" / "same.jpg")
    write_image(str(tmp_path / "d" / "extra" / "more.png"), PALETTE[2], size=8)
    os.symlink("../../extra", tmp_path / "d" / "train" / "class_2" / "zz")  # links inside the root are followed
    dm = ImageFolderDataModule(root, **SMALL)
    train_dir = os.path.join(root, "train")
    index = {name: i for i, name in enumerate(dm.class_names)}
    expected = make_dataset(train_dir, index, extensions=(".jpg", ".png"), allow_empty=True)
    assert dm._samples(train_dir) == expected and len(expected) == 9 + 8 + 1 + 1


def _loop_error(root, **kwargs):
    with pytest.raises(ValueError) as err:
        ImageFolderDataModule(root, val_fraction=0.34, **SMALL, **kwargs).setup()
    return str(err.value)


def test_a_folder_link_loop_is_an_error_naming_the_link(tmp_path, capsys):
    root = make_image_folder(tmp_path / "d", n_classes=3, per_class=2)
    loop = tmp_path / "d" / "train" / "class_0" / "loop"
    os.symlink("..", loop)  # the report's `ln -s .. train/a/loop`: 12 images became 492
    message = _loop_error(root)
    assert message.startswith(f"{loop}: symbolic link to {tmp_path / 'd' / 'train'} leads into "
                              f"{tmp_path / 'd' / 'train' / 'class_0'}, a folder already walked")
    line = _one_line_error(capsys, ["data", "verify", "--dataset", "folder", "--root", root])
    assert line.startswith(f"error: {loop}: symbolic link") and "no link loops" in line
    os.remove(loop)
    # A second way into class_1 (its images would get two labels), found before and after class_1 is walked.
    for link in (tmp_path / "d" / "train" / "class_2" / "again", tmp_path / "d" / "train" / "class_0" / "ahead"):
        os.symlink("../class_1", link)
        message = _loop_error(root)
        assert message.startswith(f"{link}: symbolic link") and "every folder once" in message, message
        os.remove(link)
    ImageFolderDataModule(root, val_fraction=0.34, **SMALL).setup()


@pytest.mark.parametrize("kind", ["file", "folder"])
def test_a_link_leaving_the_root_is_an_error_unless_followed_on_purpose(tmp_path, kind):
    root = make_image_folder(tmp_path / "d", n_classes=2, per_class=2)
    elsewhere = write_image(str(tmp_path / "elsewhere" / "photo.jpg"), PALETTE[0])
    target = elsewhere if kind == "file" else os.path.dirname(elsewhere)
    link = tmp_path / "d" / "train" / "class_0" / ("photo.jpg" if kind == "file" else "more")
    os.symlink(target, link)
    message = _loop_error(root)
    assert message.startswith(f"{link}: symbolic link to {target}, outside the dataset root")
    assert "follow_external_links" in message
    dm = ImageFolderDataModule(root, val_fraction=0.34, follow_external_links=True, **SMALL)
    dm.setup()
    paths = [p for p, _ in dm.train_dataset.samples + dm.val_dataset.samples]
    assert sum(os.path.realpath(p) == elsewhere for p in paths) == 1 and len(paths) == 5
    assert dm.hparams["follow_external_links"] is True


# ---- Decompression bombs -------------------------------------------------------------------------------------------
def write_bomb(path, width=20000, height=20000):
    """A PNG whose header claims width × height pixels (57 bytes: PIL refuses it before decoding)."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
                + chunk(b"IEND", b""))
    return str(path)


def test_a_decompression_bomb_is_an_unreadable_image_naming_the_file(tmp_path, monkeypatch, caplog):
    bomb = write_bomb(tmp_path / "bomb.png")
    with pytest.raises(ImageLoadError, match=rf"^{bomb}: image of 400000000 pixels, more than PIL's "
                                             rf"decompression-bomb limit of {2 * Image.MAX_IMAGE_PIXELS} pixels"):
        load_rgb(bomb)
    real = write_image(str(tmp_path / "real.png"), PALETTE[0], size=48)  # a real image, over a lowered limit
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(ImageLoadError, match=rf"^{real}: image of 2304 pixels, more than .* limit of 2000 pixels"):
        decode_rgb(real, resize=40)
    good = write_image(str(tmp_path / "good.png"), PALETTE[1], size=16)
    dataset = ImageListDataset([(bomb, 0), (good, 1)], ["a", "b"])
    dataset.skip_corrupt = True
    with caplog.at_level(logging.WARNING):
        image, label = dataset[0]
    assert label == 1 and image.size == (16, 16) and bomb in dataset.skipped and bomb in caplog.text


def test_a_decompression_bomb_is_one_line_in_data_verify_and_fit(tmp_path, capsys, trained_run):
    root = make_image_folder(tmp_path / "d", n_classes=2, per_class=2)
    bomb = write_bomb(tmp_path / "d" / "test" / "class_1" / "huge.png")
    from finegrained.cli import main

    assert main(["data", "verify", "--dataset", "folder", "--root", root]) == 1
    assert f"{bomb}: image of 400000000 pixels" in capsys.readouterr().out
    recipe, _, _ = trained_run
    for path in [os.path.join(d, f) for d, _, files in os.walk(os.path.join(root, "train")) for f in files]:
        write_bomb(path)
    line = _one_line_error(capsys, ["fit", "--config", recipe, "--trainer.fast_dev_run", "true", "--runs_csv", "",
                                    "--trainer.default_root_dir", str(tmp_path), "--data.init_args.root", root])
    assert "image of 400000000 pixels" in line and os.path.join(root, "train") in line


# ---- 16-bit greyscale and EXIF orientation -------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["I;16", "I;16B", "I"])
def test_16_bit_greyscale_is_scaled_to_8_bits(tmp_path, monkeypatch, mode):
    from PIL import PngImagePlugin

    values = np.random.default_rng(0).integers(0, 65536, (7, 9)).astype(np.int64)
    values[0, :4] = [0, 128, 129, 65535]  # 128 / 257 rounds down, 129 / 257 up
    path = tmp_path / ("grey16.tiff" if mode == "I;16B" else "grey16.png")  # Pillow reads 16-bit PNGs as I;16
    Image.fromarray(values.astype(">u2" if mode == "I;16B" else "<u2")).save(path)
    if mode == "I":  # how older Pillow versions opened 16-bit grey PNGs
        monkeypatch.setitem(PngImagePlugin._MODES, (16, 0), ("I", "I;16B"))
    with Image.open(path) as stored:
        assert stored.mode == mode
    expected = np.round(values * 255 / 65535).astype(np.uint8)
    decoded = np.asarray(load_rgb(path))
    assert decoded.shape == (7, 9, 3) and (decoded == expected[..., None]).all()


def write_rotated_photo(path, orientation=6):
    """A 30 × 20 JPEG with a different colour in each corner, stored with EXIF orientation ``orientation``."""
    pixels = np.zeros((20, 30, 3), np.uint8)
    pixels[:10, :15], pixels[:10, 15:], pixels[10:, :15], pixels[10:, 15:] = PALETTE[:4]
    exif = Image.Exif()
    exif[0x0112] = orientation
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(pixels).save(path, exif=exif.tobytes(), quality=95)
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB")), np.asarray(ImageOps.exif_transpose(image).convert("RGB"))


def test_exif_orientation_is_applied_only_with_exif_transpose(tmp_path):
    root = tmp_path / "d"
    stored, upright = None, None
    for split in ("train", "val", "test"):
        for c in range(2):
            stored, upright = write_rotated_photo(str(root / split / f"class_{c}" / "photo.jpg"))
    assert stored.shape == (20, 30, 3) and upright.shape == (30, 20, 3)
    path = str(root / "train" / "class_0" / "photo.jpg")
    assert np.array_equal(np.asarray(load_rgb(path)), stored)
    assert np.array_equal(np.asarray(decode_rgb(path, exif_transpose=True)[0]), upright)
    (tmp_path / "train.csv").write_text("train/class_0/photo.jpg,a\ntrain/class_1/photo.jpg,b\n")
    (tmp_path / "test.csv").write_text("test/class_0/photo.jpg,a\ntest/class_1/photo.jpg,b\n")
    csv_args = (str(root), str(tmp_path / "train.csv"), str(tmp_path / "test.csv"))
    for make in (lambda **kw: ImageFolderDataModule(str(root), **kw), lambda **kw: CSVDataModule(*csv_args, **kw)):
        for option, expected in ((False, stored), (True, upright)):
            dm = make(exif_transpose=option, **SMALL)
            dm.setup()
            assert dm.preprocessing["exif_transpose"] is option
            for dataset in (dm.train_dataset, dm.test_dataset):
                assert np.array_equal(np.asarray(dataset.load_image(0)), expected)
        default = make(**SMALL)
        assert default.preprocessing["exif_transpose"] is False


# ---- Shards: one output per folder, samples decoded with names ----------------------------------------------------
def _shard(args):
    from finegrained.cli import main

    return main(["data", "shard", "--size", "32", "--shard-size", "2", *args])


def test_data_shard_refuses_a_non_empty_out_and_overwrite_replaces_only_its_own_output(tmp_path, capsys):
    from datamodules.shards import shard_counts

    big = make_image_folder(tmp_path / "big", n_classes=3, per_class=4, size=24)
    small = make_image_folder(tmp_path / "small", n_classes=2, per_class=2, size=24)
    out = tmp_path / "shards"
    assert _shard(["--dataset", "folder", "--root", big, "--out", str(out)]) == 0
    assert shard_counts(str(out)) == {"train": 9, "val": 3, "test": 12}
    before = sorted(os.listdir(out))
    line = _one_line_error(capsys, ["data", "shard", "--dataset", "folder", "--root", small, "--out", str(out)])
    assert f"{out}: not empty" in line and "--overwrite" in line
    assert sorted(os.listdir(out)) == before
    assert _shard(["--dataset", "folder", "--root", small, "--out", str(out), "--overwrite"]) == 0
    assert shard_counts(str(out)) == {"train": 2, "val": 2, "test": 4}
    index = json.load(open(out / "index.json"))
    listed = {shard["shard"] for shards in index["splits"].values() for shard in shards}
    assert sorted(os.listdir(out)) == sorted(listed | {"index.json"})  # no shard of the first output is left
    dm = ShardDataModule(str(out), **SMALL)
    dm.setup()
    assert len(dm.train_dataset) == 2 and dm.class_names == ["class_0", "class_1"]
    (out / "notes.txt").write_text("mine")
    line = _one_line_error(capsys, ["data", "shard", "--dataset", "folder", "--root", small, "--out", str(out),
                                    "--overwrite"])
    assert f"{out}: holds 1 file(s) that index.json does not list (notes.txt)" in line
    assert (out / "notes.txt").read_text() == "mine" and (out / "index.json").exists()
    other = tmp_path / "other"
    other.mkdir()
    (other / "photo.jpg").write_text("not a shard output")
    line = _one_line_error(capsys, ["data", "shard", "--dataset", "folder", "--root", small, "--out", str(other),
                                    "--overwrite"])
    assert f"{other}: not the output of finegrained data shard" in line
    assert os.listdir(other) == ["photo.jpg"]
    bad = os.path.join(small, "test", "class_1", "test_001.png")
    open(bad, "wb").write(b"not an image")
    fresh = tmp_path / "fresh"
    line = _one_line_error(capsys, ["data", "shard", "--dataset", "folder", "--root", small, "--out", str(fresh)])
    assert bad in line and os.listdir(fresh) == []  # the shards written before the bad image are removed again


@pytest.fixture
def shard_dir(tmp_path):
    root = make_image_folder(tmp_path / "f", n_classes=2, per_class=3, size=24)
    out = tmp_path / "shards"
    assert _shard(["--dataset", "folder", "--root", root, "--out", str(out)]) == 0
    return out


def _corrupt_sample(out, shard, key):
    """Overwrite the JPEG bytes of sample ``key`` of ``shard`` in place; returns its index in the train split."""
    index = json.load(open(out / "index.json"))
    position = 0
    for entry in index["splits"]["train"]:
        for offset, size, label, sample_key in entry["samples"]:
            if (entry["shard"], sample_key) == (shard, key):
                with open(out / shard, "r+b") as f:
                    f.seek(offset)
                    f.write(b"\0" * size)
                return position
            position += 1
    raise AssertionError(f"no sample {key} in {shard}")


def test_a_bad_shard_sample_names_shard_and_key_and_skip_corrupt_skips_it(shard_dir, caplog):
    with tarfile.open(shard_dir / "train-000001.tar") as tar:
        key = tar.getnames()[0].split(".")[0]
    position = _corrupt_sample(shard_dir, "train-000001.tar", key)
    name = f"{shard_dir / 'train-000001.tar'}: sample {key}"
    strict = ShardDataModule(str(shard_dir), **SMALL)
    strict.setup()
    with pytest.raises(ImageLoadError, match=f"^{name}: (not a readable image|corrupt)"):
        strict.train_dataset[position]
    with pytest.raises(ImageLoadError, match=f"^{name}"):
        strict.train_dataset[[0, position]]
    lenient = ShardDataModule(str(shard_dir), skip_corrupt=True, **SMALL)
    lenient.setup()
    with caplog.at_level(logging.WARNING):
        images, labels = lenient.train_dataset[[position, 0]]
    assert tuple(images.shape) == (2, 3, 32, 32)
    assert labels.tolist() == [lenient.train_dataset.targets[position + 1], lenient.train_dataset.targets[0]]
    assert lenient.train_dataset.skipped == {name} and name in caplog.text


def test_shard_index_entries_name_their_key_and_older_entries_still_read(shard_dir):
    index = json.load(open(shard_dir / "index.json"))
    first = index["splits"]["train"][0]
    with tarfile.open(shard_dir / first["shard"]) as tar:
        keys = list(dict.fromkeys(name.split(".")[0] for name in tar.getnames()))
    assert [sample[3] for sample in first["samples"]] == keys
    fresh = ShardDataModule(str(shard_dir), **SMALL)
    fresh.setup()
    for split in index["splits"].values():  # an index written without keys: [offset, size, label]
        for entry in split:
            entry["samples"] = [sample[:3] for sample in entry["samples"]]
    json.dump(index, open(shard_dir / "index.json", "w"))
    old = ShardDataModule(str(shard_dir), **SMALL)
    old.setup()
    assert old.train_dataset.targets == fresh.train_dataset.targets
    assert np.array_equal(np.asarray(old.train_dataset.load_image(1)), np.asarray(fresh.train_dataset.load_image(1)))
    offset = first["samples"][0][0]
    assert old.train_dataset.sample_name(0) == f"{shard_dir / first['shard']}: sample at byte {offset}"


# ---- Class names as folder names ----------------------------------------------------------------------------------
def test_safe_name_is_never_hidden_or_empty_and_keeps_classes_apart():
    names = ["..", ".", "", "a b", "a-b", "a/b", "a\\b", ".hidden", "-x", "Ünïcode", "x" * 300, "cat_1", "n02.dog-x"]
    safe = [safe_name(name) for name in names]
    assert len(set(safe)) == len(names)
    for name, folder in zip(names, safe):
        assert folder not in ("", ".", "..") and not folder.startswith((".", "-")), (name, folder)
        assert "/" not in folder and "\\" not in folder and len(folder) <= 120
        assert safe_name(name) == folder  # stable
    assert safe[names.index("a-b")] == "a-b" and safe[names.index("cat_1")] == "cat_1"
    assert safe[names.index("n02.dog-x")] == "n02.dog-x"
    assert safe[names.index("a b")] == f"a-b-{zlib.crc32(b'a b'):08x}"
    assert safe_names(["a b", "a-b", ".."]) == [safe_name("a b"), "a-b", safe_name("..")]
    with pytest.raises(ValueError, match="classes 'Cat' and 'cat' both map to the folder name 'cat'"):
        safe_names(["Cat", "cat"])


def test_samples_by_class_stay_inside_out_and_refuse_colliding_folders(tmp_path):
    class Listed:
        def __init__(self, classes):
            self.classes, self.targets = classes, list(range(len(classes)))

        def load_image(self, index):
            return Image.new("RGB", (4, 4), PALETTE[index])

    out = tmp_path / "deep" / "out"
    paths = save_samples(Listed(["..", "a b", "a-b"]), str(out), 3, by_class=True)
    assert all(os.path.commonpath([p, str(out)]) == str(out) for p in paths)
    assert len({os.path.dirname(p) for p in paths}) == 3 and sorted(os.listdir(tmp_path / "deep")) == ["out"]
    with pytest.raises(ValueError, match="both map to the folder name"):
        save_samples(Listed(["Cat", "cat"]), str(tmp_path / "cats"), 2, by_class=True)
    assert not (tmp_path / "cats").exists()
    assert len(save_samples(Listed(["Cat", "cat"]), str(tmp_path / "flat"), 2)) == 2  # numbered files never collide
