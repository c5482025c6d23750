"""CUB-200-2011, FGVC-Aircraft, Stanford Cars and CSV lists on replicas in the official formats."""
import collections
import os

import numpy as np
import pytest
import torchvision
from PIL import Image

from datamodules import CSVDataModule, CUB200DataModule, FGVCAircraftDataModule, StanfordCarsDataModule
from finegrained.cli import main
from tests.replicas import AIRCRAFT_VARIANTS, CAR_CLASSES, write_aircraft, write_cars, write_cub


# ----------------------------------------------------------------------------- CUB
@pytest.mark.parametrize("nested", [False, True])
def test_cub_splits_labels_and_root_forms(tmp_path, nested):
    base = write_cub(str(tmp_path), n_classes=4, per_class=4, nested=nested)
    for root in (str(tmp_path), base):  # the folder holding it, or the dataset folder itself
        dm = CUB200DataModule(root, num_workers=0)
        dm.setup()
        assert dm.class_names[0] == "001.Bird_kind_1" and dm.short_class_names[0] == "Bird_kind_1"
        assert len(dm.train_dataset) == 8 and len(dm.test_dataset) == 8
        assert collections.Counter(dm.train_dataset.targets) == {0: 2, 1: 2, 2: 2, 3: 2}
        path, label = dm.test_dataset.samples[0]
        assert path.endswith("001.Bird_kind_1/Bird_Kind_1_0001_2.jpg") and label == 0
        assert dm.val_dataset is dm.test_dataset  # published protocol: test doubles as validation


def test_cub_bbox_crop_and_val_fraction(tmp_path):
    write_cub(str(tmp_path), n_classes=3, per_class=6)
    dm = CUB200DataModule(str(tmp_path), bbox_crop=True, num_workers=0, resize_size=32, crop_size=32)
    dm.setup()
    # image 1: class 1, box x=5 y=3 w=20 h=12 -> 20x12 crop
    assert dm.train_dataset.load_image(0).size == (20, 12)
    x, y = dm.train_dataset[0]
    assert x.shape == (3, 32, 32) and y == 0
    held = CUB200DataModule(str(tmp_path), val_fraction=0.33, num_workers=0)
    held.setup()
    assert len(held.train_dataset) + len(held.val_dataset) == 9 and len(held.val_dataset) == 3
    assert collections.Counter(held.val_dataset.targets) == {0: 1, 1: 1, 2: 1}
    assert not {p for p, _ in held.val_dataset.samples} & {p for p, _ in held.test_dataset.samples}


def test_cub_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        CUB200DataModule(str(tmp_path / "nope")).class_names
    with pytest.raises(FileNotFoundError, match="images.txt.*CUB_200_2011"):
        CUB200DataModule(str(tmp_path)).class_names
    base = write_cub(str(tmp_path))
    os.remove(os.path.join(base, "train_test_split.txt"))
    with pytest.raises(FileNotFoundError, match="train_test_split.txt"):
        CUB200DataModule(str(tmp_path), num_workers=0).setup()


def test_cub_full_size_counts(tmp_path):
    write_cub(str(tmp_path), n_classes=200, per_class=1, placeholder=True)  # layout only; sizes below
    # Official counts need the official split: rewrite the split file with 5,994 / 5,794 over 11,788 ids.
    base = tmp_path / "CUB_200_2011"
    lines = []
    images, labels = [], []
    for k in range(11788):
        c = k % 200 + 1
        rel = f"{c:03d}.Bird_kind_{c}/img_{k}.jpg"
        images.append(f"{k + 1} {rel}")
        labels.append(f"{k + 1} {c}")
        lines.append(f"{k + 1} {1 if k < 5994 else 0}")
        (base / "images" / os.path.dirname(rel)).mkdir(parents=True, exist_ok=True)
        (base / "images" / rel).touch()
    (base / "images.txt").write_text("\n".join(images))
    (base / "image_class_labels.txt").write_text("\n".join(labels))
    (base / "train_test_split.txt").write_text("\n".join(lines))
    dm = CUB200DataModule(str(tmp_path), num_workers=0)
    dm.setup()
    assert (dm.num_classes, len(dm.train_dataset), len(dm.test_dataset)) == (200, 5994, 5794)


# ----------------------------------------------------------------------------- Aircraft
def test_aircraft_levels_splits_and_names_with_spaces(tmp_path):
    write_aircraft(str(tmp_path))
    dm = FGVCAircraftDataModule(str(tmp_path), num_workers=0)
    dm.setup()
    assert dm.class_names == AIRCRAFT_VARIANTS
    assert len(dm.train_dataset) == 16 and len(dm.test_dataset) == 8  # trainval = train + val
    assert os.path.basename(dm.train_dataset.samples[0][0]) == "0000056.jpg"  # leading zeros kept
    names = {dm.class_names[label] for _, label in dm.train_dataset.samples + dm.test_dataset.samples}
    assert {"F/A-18", "Falcon 2000"} <= names
    train_only = FGVCAircraftDataModule(str(tmp_path), train_split="train", num_workers=0)
    train_only.setup()
    assert len(train_only.train_dataset) == 8 and len(train_only.val_dataset) == 8
    assert train_only.val_dataset is not train_only.test_dataset
    for level, n in (("family", len(set(f.split("-")[0] for f in AIRCRAFT_VARIANTS))), ("manufacturer", 3)):
        assert FGVCAircraftDataModule(str(tmp_path), annotation_level=level).num_classes == n


def test_aircraft_banner_removes_exactly_20_rows_and_bbox(tmp_path):
    write_aircraft(str(tmp_path), size=(60, 50))
    dm = FGVCAircraftDataModule(str(tmp_path), num_workers=0)
    dm.setup()
    raw = Image.open(dm.train_dataset.samples[0][0]).convert("RGB")
    cropped = dm.train_dataset.load_image(0)
    assert cropped.size == (60, 30)
    assert list(cropped.getdata()) == list(raw.crop((0, 0, 60, 30)).getdata())
    kept = FGVCAircraftDataModule(str(tmp_path), crop_banner=False, num_workers=0)
    kept.setup()
    assert kept.train_dataset.load_image(0).size == (60, 50)
    boxed = FGVCAircraftDataModule(str(tmp_path), bbox_crop=True, crop_banner=False, num_workers=0)
    boxed.setup()
    # first image: box (3, 2, 56, 25), 1-based inclusive -> 54 x 24 pixels
    assert boxed.train_dataset.load_image(0).size == (54, 24)


def test_aircraft_matches_torchvision(tmp_path):
    write_aircraft(str(tmp_path), placeholder=True)
    for split in ("trainval", "test"):
        ours = FGVCAircraftDataModule(str(tmp_path), num_workers=0)
        ours.setup()
        dataset = ours.train_dataset if split == "trainval" else ours.test_dataset
        tv = torchvision.datasets.FGVCAircraft(str(tmp_path), split=split, annotation_level="variant", download=False)
        assert tv.classes == ours.class_names
        assert [os.path.normpath(p) for p in tv._image_files] == [p for p, _ in dataset.samples]
        assert tv._labels == dataset.targets


def test_aircraft_full_size_counts(tmp_path):
    variants = [f"Variant {k}/{k}" for k in range(100)]
    write_aircraft(str(tmp_path), variants=variants, n_images=10000, placeholder=True,
                   split_sizes=(3334, 3333, 3333))
    dm = FGVCAircraftDataModule(str(tmp_path), num_workers=0)
    dm.setup()
    assert (dm.num_classes, len(dm.train_dataset), len(dm.test_dataset)) == (100, 6667, 3333)


def test_aircraft_missing_annotation_file(tmp_path):
    data = write_aircraft(str(tmp_path))
    os.remove(os.path.join(data, "images_variant_test.txt"))
    with pytest.raises(FileNotFoundError, match="images_variant_test.txt"):
        FGVCAircraftDataModule(str(tmp_path), num_workers=0).setup()


# ----------------------------------------------------------------------------- Cars
@pytest.mark.parametrize("layout", ["original", "kaggle_nested", "kaggle_folders", "combined"])
def test_cars_layouts_give_official_labels(tmp_path, layout):
    _, train, test = write_cars(str(tmp_path), layout)
    dm = StanfordCarsDataModule(str(tmp_path), num_workers=0)
    assert dm.layout == layout
    assert dm.class_names == CAR_CLASSES  # official order, not alphabetical
    dm.setup()
    assert [(os.path.basename(p), l) for p, l in dm.train_dataset.samples] == [(a[0], a[5] - 1) for a in train]
    assert [(os.path.basename(p), l) for p, l in dm.test_dataset.samples] == [(a[0], a[5] - 1) for a in test]
    assert StanfordCarsDataModule(str(tmp_path), layout=layout).layout == layout


def test_cars_matches_torchvision_and_bbox(tmp_path):
    write_cars(str(tmp_path), "original")
    dm = StanfordCarsDataModule(str(tmp_path), bbox_crop=True, num_workers=0)
    dm.setup()
    for split, dataset in (("train", dm.train_dataset), ("test", dm.test_dataset)):
        tv = torchvision.datasets.StanfordCars(str(tmp_path), split=split, download=False)
        assert tv.classes == dm.class_names
        assert [(os.path.normpath(p), l) for p, l in tv._samples] == dataset.samples
    # first training image: box x1=2 y1=3 x2=30 y2=20 (1-based inclusive) -> 29 x 18
    assert dm.train_dataset.load_image(0).size == (29, 18)


def test_cars_combined_layout_splits_by_the_test_flag_and_crops_boxes(tmp_path):
    from scipy.io import loadmat, savemat

    base, train, test = write_cars(str(tmp_path), "combined")
    annos = os.path.join(base, "cars_annos.mat")
    flags = [int(t) for t in loadmat(annos, squeeze_me=True)["annotations"]["test"]]
    assert 0 < flags.index(1) < len(flags) - 1 - flags[::-1].index(0)  # the splits interleave in the file
    for root in (str(tmp_path), base, os.path.join(base, "car_ims")):
        dm = StanfordCarsDataModule(root, bbox_crop=True, num_workers=0)
        assert (dm.layout, dm.dataset_dir, dm.class_names) == ("combined", base, CAR_CLASSES)
    dm.setup()
    assert dm.train_dataset.samples == [(os.path.join(base, "car_ims", a[0]), a[5] - 1) for a in train]
    assert dm.test_dataset.samples == [(os.path.join(base, "car_ims", a[0]), a[5] - 1) for a in test]
    x1, y1, x2, y2 = train[0][1:5]  # 1-based inclusive
    assert dm.train_dataset.load_image(0).size == (x2 - x1 + 1, y2 - y1 + 1)

    mat = loadmat(annos)
    mat["annotations"][0, 0]["test"] = np.array([[2]], dtype=np.uint8)
    savemat(annos, {"annotations": mat["annotations"], "class_names": mat["class_names"]})
    with pytest.raises(ValueError, match=r"cars_annos.mat: car_ims/000001.jpg has test=2, expected 0 or 1"):
        StanfordCarsDataModule(base, num_workers=0).setup()
    savemat(annos, {"annotations": mat["annotations"]})
    with pytest.raises(ValueError, match=r"cars_annos.mat: no 'class_names' variable"):
        StanfordCarsDataModule(base, num_workers=0).class_names


def test_cars_full_size_counts_in_two_layouts(tmp_path):
    classes = [f"Car model {k}" for k in range(195)] + ["Ram C/V Cargo Van Minivan 2012"]
    labels = {}
    for layout in ("original", "kaggle_folders"):
        root = tmp_path / layout
        write_cars(str(root), layout, classes=classes, n_train=8144, n_test=8041, placeholder=True)
        dm = StanfordCarsDataModule(str(root), num_workers=0)
        dm.setup()
        assert (dm.num_classes, len(dm.train_dataset), len(dm.test_dataset)) == (196, 8144, 8041)
        labels[layout] = [l for _, l in dm.train_dataset.samples + dm.test_dataset.samples]
    assert labels["original"] == labels["kaggle_folders"]


def test_cars_unknown_layout_lists_what_was_searched(tmp_path):
    (tmp_path / "stuff").mkdir()
    with pytest.raises(FileNotFoundError) as err:
        StanfordCarsDataModule(str(tmp_path)).class_names
    for layout in ("original", "kaggle_nested", "kaggle_folders", "combined"):
        assert layout in str(err.value)


# ----------------------------------------------------------------------------- CSV
def test_csv_lists_names_and_indices(tmp_path):
    from tests.conftest import write_image

    for name in ("a/1.jpg", "a/2.jpg", "b/3.jpg", "b/4.jpg"):
        write_image(str(tmp_path / "img" / name), (10, 20, 30), size=16)
    (tmp_path / "train.csv").write_text("path,label\na/1.jpg,cat\nb/3.jpg,dog\n")
    (tmp_path / "test.csv").write_text("a/2.jpg,0\nb/4.jpg,dog\n")
    dm = CSVDataModule(str(tmp_path / "img"), str(tmp_path / "train.csv"), str(tmp_path / "test.csv"),
                       num_workers=0, resize_size=16, crop_size=16)
    assert dm.class_names == ["cat", "dog"]
    dm.setup()
    assert dm.train_dataset.targets == [0, 1] and dm.test_dataset.targets == [0, 1]
    assert dm.test_dataset[0][0].shape == (3, 16, 16)


# ----------------------------------------------------------------------------- decoding and verify
def test_large_jpeg_is_draft_decoded(tmp_path):
    from datamodules.io import decode_rgb

    path = tmp_path / "big.jpg"
    Image.new("RGB", (1600, 1067), (120, 30, 60)).save(path, quality=90)
    image, scale = decode_rgb(path, [512, 512])
    assert image.size == (800, 534) and scale == 0.5  # smallest DCT scale still covering 512x512
    full, scale = decode_rgb(path, 448 * 2)
    assert full.size == (1600, 1067) and scale == 1.0


def test_data_verify_names_corrupt_file_and_fails(tmp_path, capsys):
    base = write_cub(str(tmp_path))
    bad = os.path.join(base, "images", "002.Bird_kind_2", "Bird_Kind_2_0000_5.jpg")
    with open(bad, "wb") as f:
        f.write(b"\xff\xd8\xff corrupt")
    assert main(["data", "verify", "--dataset", "cub", "--root", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert bad in out and "5,994" not in out
    assert "001.Bird_kind_1" in out and "train" in out
    os.remove(bad)
    write_cub(str(tmp_path))
    assert main(["data", "verify", "--dataset", "cub", "--root", str(tmp_path)]) == 0


def test_recipe_can_select_dataset_through_lightningcli(tmp_path):
    write_cub(str(tmp_path / "cub"), n_classes=3, per_class=4)
    cfg = tmp_path / "r.yaml"
    cfg.write_text(f"""
trainer: {{fast_dev_run: true, accelerator: cpu, enable_progress_bar: false, logger: false,
           default_root_dir: {tmp_path}}}
model: {{backbone: resnet18, backbone_weights: null, head: gap}}
data:
  class_path: datamodules.CUB200DataModule
  init_args: {{root: /nonexistent, num_workers: 0, batch_size: 2, resize_size: 64, crop_size: 64}}
""")
    assert main(["fit", "--config", str(cfg), "--data.root", str(tmp_path / "cub"),
                 "--runs_csv", str(tmp_path / "runs.csv")]) == 0
