"""NABirds, Stanford Dogs, Flowers-102, Oxford-IIIT Pet, Food-101 and iNaturalist on replicas in their official
formats (docs/guide/datasets.md): labels and class order as the official files define them, root at every level,
bounding boxes, errors that name the file, and agreement with torchvision where it reads the set."""
import io
import os
from unittest import mock

import pytest
import torch

from datamodules import (Flowers102DataModule, Food101DataModule, INaturalistDataModule, NABirdsDataModule,
                         OxfordIIITPetDataModule, StanfordDogsDataModule)
from datamodules.inaturalist import UNLABELLED
from datamodules.verify import verify_datamodule
from tests.replicas import (DOG_BREEDS, FOOD_CLASSES, NABIRDS_LEAVES, write_dogs, write_flowers, write_food101,
                            write_inaturalist, write_nabirds, write_pets)

SMALL = dict(batch_size=2, num_workers=0, resize_size=40, crop_size=32)


def _setup(dm):
    dm.prepare_data()
    dm.setup("fit")
    return dm


def _at_level(module, tmp_path, base, level, **kwargs):
    """The DataModule set up with ``root`` at the download's parent, the dataset folder, or the folder ``level``
    inside it."""
    root = {"parent": str(tmp_path), "dataset": base}.get(level) or os.path.join(base, level)
    return _setup(module(root, **SMALL, **kwargs))


def _relative(samples, base):
    return [(os.path.relpath(path, base), label) for path, label in samples]


# ---- NABirds --------------------------------------------------------------------------------------------------
def test_nabirds_labels_are_the_leaf_ids_in_ascending_order(tmp_path):
    base = write_nabirds(str(tmp_path))
    dm = _setup(NABirdsDataModule(str(tmp_path), **SMALL))
    assert dm.leaf_ids == sorted(NABIRDS_LEAVES) == [37, 295, 817, 1000]
    assert dm.class_names == [f"Bird species {c}" for c in sorted(NABIRDS_LEAVES)]  # inner taxonomy nodes left out
    for path, label in dm.train_dataset.samples + dm.test_dataset.samples:
        assert os.path.isfile(path) and int(os.path.basename(os.path.dirname(path))) == dm.leaf_ids[label]
    assert len(dm.train_dataset) == len(dm.test_dataset) == 8 and dm.val_dataset is dm.test_dataset
    assert os.path.dirname(dm.dataset_dir) == os.path.dirname(base)


@pytest.mark.parametrize("level", ["parent", "dataset", "images"])
def test_nabirds_root_at_every_level_and_boxes(tmp_path, level):
    base = write_nabirds(str(tmp_path))
    root = {"parent": str(tmp_path), "dataset": base, "images": os.path.join(base, "images")}[level]
    dm = _setup(NABirdsDataModule(root, bbox_crop=True, **SMALL))
    assert dm.dataset_dir == base
    assert dm.train_dataset.boxes[0] == (2.0, 3.0, 22.0, 15.0)  # x, y, w, h -> left, upper, right, lower
    assert dm.train_dataset.load_image(0).size == (20, 12)


def test_nabirds_missing_file_and_bad_line_name_the_file(tmp_path):
    base = write_nabirds(str(tmp_path))
    with open(os.path.join(base, "image_class_labels.txt"), "a") as f:
        f.write("lonely\n")
    with pytest.raises(ValueError, match=r"image_class_labels.txt, line 17"):
        _setup(NABirdsDataModule(base, **SMALL))
    os.remove(os.path.join(base, "train_test_split.txt"))
    with pytest.raises(FileNotFoundError, match="train_test_split.txt"):
        _setup(NABirdsDataModule(base, **SMALL))


# ---- Stanford Dogs ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("level", ["parent", "dataset", "Images"])
def test_dogs_labels_names_and_the_union_of_dog_boxes(tmp_path, level):
    base = write_dogs(str(tmp_path))
    root = {"parent": str(tmp_path), "dataset": base, "Images": os.path.join(base, "Images")}[level]
    dm = _setup(StanfordDogsDataModule(root, bbox_crop=True, **SMALL))
    assert dm.class_names == DOG_BREEDS  # labels - 1, folder names in label order
    assert _relative(dm.train_dataset.samples, base)[:2] == [
        ("Images/n02085620-Chihuahua/n02085620_100.jpg", 0), ("Images/n02085620-Chihuahua/n02085620_102.jpg", 0)]
    assert len(dm.train_dataset) == len(dm.test_dataset) == 6
    assert dm.train_dataset.boxes[0] == (3.0, 2.0, 45.0, 30.0)  # two dogs: the box covering both
    assert dm.train_dataset.boxes[1] == (3.0, 4.0, 22.0, 30.0)


def test_dogs_errors_name_the_file(tmp_path):
    base = write_dogs(str(tmp_path))
    with open(os.path.join(base, "Annotation", DOG_BREEDS[0], "n02085620_100"), "w") as f:
        f.write("<annotation><object><bndbox><xmin>1</xmin></bndbox></object></annotation>")
    with pytest.raises(ValueError, match="n02085620_100: object 1 has no numeric"):
        _setup(StanfordDogsDataModule(base, bbox_crop=True, **SMALL))
    open(os.path.join(base, "test_list.mat"), "wb").close()
    with pytest.raises(ValueError, match="test_list.mat: cannot read as a MATLAB file"):
        _setup(StanfordDogsDataModule(base, **SMALL))


# ---- Flowers-102 ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("level", ["parent", "dataset", "jpg"])
def test_flowers_agree_with_torchvision(tmp_path, level):
    from torchvision.datasets import Flowers102

    dm = _at_level(Flowers102DataModule, tmp_path, write_flowers(str(tmp_path)), level, train_split="train")
    assert dm.class_names[0] == "pink primrose" and len(dm.class_names) == 102
    with mock.patch.object(Flowers102, "_check_integrity", return_value=True):  # it checks the real files' MD5
        for split, dataset in (("train", dm.train_dataset), ("val", dm.val_dataset), ("test", dm.test_dataset)):
            reference = Flowers102(str(tmp_path), split=split)
            assert [os.path.abspath(p) for p in reference._image_files] == [p for p, _ in dataset.samples]
            assert reference._labels == dataset.targets  # imagelabels - 1
    assert dm.val_dataset is not dm.test_dataset and len(dm.val_dataset) == 8  # the official validation split


def test_flowers_train_on_train_and_val_by_default(tmp_path):
    """The transfer protocol: trnid + valid (2,040 images in the real set) to train, the test split to test."""
    from torchvision.datasets import Flowers102

    base = write_flowers(str(tmp_path))
    dm = _setup(Flowers102DataModule(base, **SMALL))
    with mock.patch.object(Flowers102, "_check_integrity", return_value=True):
        expected = [os.path.abspath(p) for split in ("train", "val")
                    for p in Flowers102(str(tmp_path), split=split)._image_files]
        test = [os.path.abspath(p) for p in Flowers102(str(tmp_path), split="test")._image_files]
    assert [p for p, _ in dm.train_dataset.samples] == expected
    assert [p for p, _ in dm.test_dataset.samples] == test and dm.val_dataset is dm.test_dataset
    with pytest.raises(ValueError, match="train_split must be 'trainval' or 'train'"):
        Flowers102DataModule(base, train_split="all")


# ---- Oxford-IIIT Pet ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("level", ["parent", "dataset", "annotations"])
def test_pets_agree_with_torchvision_but_keep_the_file_names(tmp_path, level):
    from torchvision.datasets import OxfordIIITPet

    dm = _at_level(OxfordIIITPetDataModule, tmp_path, write_pets(str(tmp_path)), level)
    assert dm.class_names == ["Abyssinian", "american_bulldog", "Bengal", "yorkshire_terrier"]  # class id order
    for split, dataset in (("trainval", dm.train_dataset), ("test", dm.test_dataset)):
        reference = OxfordIIITPet(str(tmp_path), split=split)
        assert [os.path.abspath(p) for p in reference._images] == [p for p, _ in dataset.samples]
        assert reference._labels == dataset.targets  # class id - 1
        # torchvision title-cases the names: the only difference
        assert reference.classes == [" ".join(w.title() for w in n.split("_")) for n in dm.class_names]
    assert not any(p.endswith(".mat") for p, _ in dm.train_dataset.samples)  # list files, not a glob


def test_pets_bad_class_id_names_file_and_line(tmp_path):
    base = write_pets(str(tmp_path))
    with open(os.path.join(base, "annotations", "test.txt"), "a") as f:
        f.write("Bengal_999 38 1 3\n")
    with pytest.raises(ValueError, match=r"test.txt, line 9: class id '38'"):
        _setup(OxfordIIITPetDataModule(base, **SMALL))


# ---- Food-101 -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("level", ["parent", "dataset", "meta"])
def test_food101_follows_classes_txt_where_torchvision_sorts(tmp_path, level):
    from torchvision.datasets import Food101

    dm = _at_level(Food101DataModule, tmp_path, write_food101(str(tmp_path)), level)
    assert dm.class_names == FOOD_CLASSES  # cheesecake before cheese_plate, as meta/classes.txt
    for split, dataset in (("train", dm.train_dataset), ("test", dm.test_dataset)):
        reference = Food101(str(tmp_path), split=split)
        assert sorted(os.path.abspath(p) for p in reference._image_files) == sorted(p for p, _ in dataset.samples)
        ours = {p: dm.class_names[label] for p, label in dataset.samples}
        theirs = {os.path.abspath(p): reference.classes[label] for p, label in zip(reference._image_files,
                                                                                   reference._labels)}
        assert ours == theirs  # the same class for every image; only the label numbers of two classes differ
    assert Food101(str(tmp_path)).classes == sorted(FOOD_CLASSES) != FOOD_CLASSES


# ---- iNaturalist ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("version", ["2017", "2018", "2021", "2021_mini"])
def test_inaturalist_labels_are_category_ids_and_val_is_official(tmp_path, version):
    base = write_inaturalist(str(tmp_path), version)
    dm = _setup(INaturalistDataModule(str(tmp_path), version=version, **SMALL))
    assert dm.dataset_dir == base
    assert dm.class_names == ["zebra finch", "robin", "mallard"]  # category_id order, not the folders' order
    for path, label in dm.train_dataset.samples + dm.val_dataset.samples:
        assert os.path.isfile(path)
        folder = os.path.basename(os.path.dirname(path))
        assert folder.endswith(dm.class_names[label].replace(" ", "_")) or folder == str(label)
    assert len(dm.train_dataset) == len(dm.val_dataset) == 9
    assert dm.test_dataset is dm.val_dataset  # the test JSON has no labels: results are reported on val
    predict = dm.predict_dataloader().dataset
    assert len(predict) == 3 and set(predict.targets) == {UNLABELLED}


def test_inaturalist_unknown_version_and_bad_category(tmp_path):
    with pytest.raises(ValueError, match="version must be one of"):
        INaturalistDataModule(str(tmp_path), version="2019")
    base = write_inaturalist(str(tmp_path), "2021_mini")
    import json

    path = os.path.join(base, "val.json")
    content = json.load(open(path))
    content["annotations"][0]["category_id"] = 42
    json.dump(content, open(path, "w"))
    with pytest.raises(ValueError, match=r"val.json: annotation 1 has category_id 42"):
        _setup(INaturalistDataModule(base, version="2021_mini", **SMALL))


def test_finegrained_data_verify_reads_the_new_sets(tmp_path):
    write_dogs(str(tmp_path / "dogs"))
    out = io.StringIO()
    problems = verify_datamodule(StanfordDogsDataModule(str(tmp_path / "dogs"), **SMALL), out=out)
    assert problems == [] and "3 classes" in out.getvalue()


def test_data_verify_command_knows_the_new_sets(tmp_path, capsys):
    from finegrained.cli import main

    write_inaturalist(str(tmp_path), "2018")
    assert main(["data", "verify", "--dataset", "inaturalist", "--version", "2018", "--root", str(tmp_path)]) == 0
    assert "3 classes" in capsys.readouterr().out


# ---- Hugging Face datasets ------------------------------------------------------------------------------------------
def _hf_replica(tmp_path):
    """A DatasetDict built from the CUB replica's images (Image feature, ClassLabel names), saved both ways."""
    import datasets

    from datamodules import CUB200DataModule
    from tests.replicas import write_cub

    write_cub(str(tmp_path / "cub"), n_classes=3, per_class=4)
    cub = _setup(CUB200DataModule(str(tmp_path / "cub"), **SMALL))
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=cub.class_names)})
    splits = datasets.DatasetDict({
        name: datasets.Dataset.from_dict({"image": [p for p, _ in d.samples], "label": d.targets}, features=features)
        for name, d in (("train", cub.train_dataset), ("test", cub.test_dataset))})
    splits.save_to_disk(str(tmp_path / "saved"))
    os.makedirs(tmp_path / "parquet" / "data")
    for name, split in splits.items():
        split.to_parquet(str(tmp_path / "parquet" / "data" / f"{name}-00000-of-00001.parquet"))
    return cub


@pytest.mark.parametrize("form", ["saved", "parquet"])
def test_huggingface_datasets_read_like_the_folders_they_came_from(tmp_path, form):
    import numpy as np

    from datamodules import HuggingFaceDataModule

    cub = _hf_replica(tmp_path)
    dm = _setup(HuggingFaceDataModule(str(tmp_path / form), **SMALL))
    assert dm.class_names == cub.class_names  # from the ClassLabel feature
    assert dm.train_dataset.targets == cub.train_dataset.targets and dm.val_dataset is dm.test_dataset
    for ours, theirs in ((dm.train_dataset, cub.train_dataset), (dm.test_dataset, cub.test_dataset)):
        for k in (0, len(theirs) - 1):
            assert np.array_equal(np.asarray(ours.load_image(k)), np.asarray(theirs.load_image(k)))
    image, label = dm.test_dataset[0]
    assert tuple(image.shape) == (3, 32, 32) and label == cub.test_dataset.targets[0]
    held = _setup(HuggingFaceDataModule(str(tmp_path / form), val_fraction=0.34, **SMALL))
    assert len(held.train_dataset) + len(held.val_dataset) == len(cub.train_dataset)
    assert set(held.train_dataset.indices).isdisjoint(held.val_dataset.indices)


def test_huggingface_errors_name_what_is_missing(tmp_path):
    from datamodules import HuggingFaceDataModule

    _hf_replica(tmp_path)
    with pytest.raises(ValueError, match="no column 'img'"):
        _setup(HuggingFaceDataModule(str(tmp_path / "saved"), image_column="img", **SMALL))
    with pytest.raises(ValueError, match="no split 'validation'"):
        _setup(HuggingFaceDataModule(str(tmp_path / "saved"), val_split="validation", **SMALL))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="neither a datasets.save_to_disk folder"):
        _setup(HuggingFaceDataModule(str(tmp_path / "empty"), **SMALL))


# ---- WebDataset shards for several machines --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    from finegrained.cli import main

    tmp = tmp_path_factory.mktemp("shards")
    write_food101(str(tmp / "food"), per_class=5)  # 12 train / 8 test images, 4 classes
    out = tmp / "shards"
    assert main(["data", "shard", "--dataset", "food101", "--root", str(tmp / "food"), "--out", str(out),
                 "--size", "32", "--shard-size", "5"]) == 0
    return tmp / "food", out


def test_shards_are_webdataset_tars_holding_every_image_and_label(shards):
    import tarfile

    import numpy as np

    from datamodules import ShardDataModule
    from datamodules.shards import shard_counts

    food, out = shards
    assert shard_counts(str(out)) == {"train": 12, "test": 8}
    assert sorted(f for f in os.listdir(out) if f.endswith(".tar"))[:3] == ["test-000000.tar", "test-000001.tar",
                                                                            "train-000000.tar"]
    with tarfile.open(out / "train-000000.tar") as tar:
        assert tar.getnames()[:2] == ["000000000.cls", "000000000.jpg"] or \
            sorted(tar.getnames()[:2]) == ["000000000.cls", "000000000.jpg"]
    original = _setup(Food101DataModule(str(food), **SMALL))
    dm = _setup(ShardDataModule(str(out), **SMALL))
    assert dm.class_names == FOOD_CLASSES and dm.val_dataset is dm.test_dataset
    assert (dm.dataset_id, dm.dataset_name) == ("food101", "Food-101 (shards)")  # the run records' dataset
    assert dm.train_dataset.targets == original.train_dataset.targets
    from PIL import Image

    stored = np.asarray(dm.train_dataset.load_image(3))  # shorter side --size 32, JPEG quality 90
    source = np.asarray(original.train_dataset.load_image(3).resize((32, 32), Image.BICUBIC))
    assert stored.shape == source.shape and np.abs(stored.astype(int) - source).mean() < 12
    images, labels = next(iter(dm.train_dataloader()))
    assert tuple(images.shape) == (2, 3, 32, 32) and labels.dtype == torch.int64


@pytest.mark.parametrize("world", [1, 2, 3, 5])
def test_every_process_reads_its_part_exactly_once_per_epoch(shards, world):
    from datamodules.shards import ExactShardSampler, read_order

    _, out = shards
    orders = {}
    for epoch in (0, 1):
        parts = [read_order(str(out), world, rank, epoch, batch_size=2) for rank in range(world)]
        union = [i for part in parts for i in part]
        assert sorted(union) == list(range(12))  # every sample once, none twice
        orders[epoch] = parts
        from datamodules import ShardDataModule

        dm = _setup(ShardDataModule(str(out), batch_size=2, num_workers=0))
        steps = {len(ExactShardSampler(dm.train_dataset, 2, world, rank)) for rank in range(world)}
        assert len(steps) == 1  # the same number of steps on every process
    assert orders[0] != orders[1]  # shuffled per epoch
    assert orders[0] == [read_order(str(out), world, rank, 0, batch_size=2) for rank in range(world)]  # replayable


@pytest.mark.parametrize("num_workers", [0, 2])
def test_shard_loader_resumes_mid_epoch_after_the_batches_it_consumed(shards, num_workers):
    from datamodules import ShardDataModule
    from datamodules.shards import ExactShardSampler, ShardLoader, read_order

    _, out = shards
    dataset = _setup(ShardDataModule(str(out), **SMALL)).train_dataset
    labels = lambda batches: [label for _, ys in batches for label in ys.tolist()]  # noqa: E731

    def loader(world=2, rank=1, batch_size=2):
        return ShardLoader(dataset, ExactShardSampler(dataset, batch_size, world, rank, seed=0), num_workers=num_workers)

    whole = loader()
    whole.sampler.set_epoch(3)
    expected = [dataset.targets[i] for i in read_order(str(out), 2, 1, 3, batch_size=2)]
    assert labels(list(whole)) == expected and whole.state_dict()["batches"] == 3

    first = loader()
    first.sampler.set_epoch(3)
    batches = iter(first)
    consumed = [next(batches), next(batches)]
    state = first.state_dict()
    assert state == {"epoch": 3, "batches": 2, "world": 2, "batches_per_epoch": 3, "seed": 0}

    resumed = loader()
    resumed.load_state_dict(state)
    batches = iter(resumed)  # created before the epoch is set, as Lightning does on a restart
    resumed.sampler.set_epoch(3)
    rest = list(batches)
    assert len(rest) == 1 and labels(consumed + rest) == expected
    resumed.sampler.set_epoch(4)  # the next epoch is whole again
    assert labels(list(resumed)) == [dataset.targets[i] for i in read_order(str(out), 2, 1, 4, batch_size=2)]
    assert resumed.state_dict()["batches"] == 3

    finished = loader()
    finished.load_state_dict({**state, "batches": 3})  # saved at the end of epoch 3: epoch 4 is whole
    finished.sampler.set_epoch(4)
    assert len(list(finished)) == 3

    other = loader(world=3, rank=0)
    with pytest.warns(UserWarning, match="starts from its first batch"):
        other.load_state_dict(state)
    other.sampler.set_epoch(3)
    assert len(list(other)) == len(other)


def _shard_fit_recipe(path, shards_dir, **data):
    """A recipe: MobileNet-V2 + GAP fitted for 2 epochs by 2 gloo processes on the shards, without validation (the
    tests check which images each rank reads; a small backbone keeps the fits short)."""
    settings = ", ".join(f"{k}: {str(v).lower()}" for k, v in data.items())
    path.write_text(f"""
seed_everything: 0
trainer: {{accelerator: cpu, devices: 2, strategy: ddp, max_epochs: 2, enable_progress_bar: false,
          enable_model_summary: false, limit_val_batches: 0}}
model: {{backbone: mobilenet_v2, backbone_weights: null, head: gap, optim: {{lr: 0.01}}}}
data:
  class_path: datamodules.ShardDataModule
  init_args: {{root: {shards_dir}, batch_size: 2, {settings}}}
""")
    return str(path)


def test_an_interrupted_ddp_fit_on_shards_resumes_where_it_stopped(shards, tmp_path):
    """Two gloo processes: a fit stopped after 2 of 3 steps of epoch 0 and resumed from its checkpoint trains on
    exactly the batches, in the order, that the epochs' orders prescribe for a fit that never stopped."""
    import numpy as np
    import torch as _torch

    from datamodules import ShardDataModule
    from datamodules.shards import read_order
    from tests.conftest import callback_args, run_finegrained

    _, out = shards
    data = dict(num_workers=1, resize_size=32, crop_size=32, hflip=False, train_crop="center")
    recipe = _shard_fit_recipe(tmp_path / "shards.yaml", out, **data)

    def fit(name, *extra):
        run_finegrained(["fit", "--config", recipe, "--trainer.default_root_dir", str(tmp_path / name),
                         "--checkpoint.dirpath", str(tmp_path / name / "ckpt"), "--runs_csv", str(tmp_path / "runs.csv"),
                         *callback_args("SaveBatchesPerRank", folder=str(tmp_path / name)), *extra], timeout=300)
        return [[b[:4] for b in _torch.load(tmp_path / name / f"rank{r}.pt")] for r in (0, 1)]

    stopped = fit("stopped", "--trainer.max_steps", "2", "--checkpoint.every_n_train_steps", "2")
    resumed = fit("resumed", "--ckpt_path", str(tmp_path / "stopped" / "ckpt" / "last.ckpt"))
    dataset = _setup(ShardDataModule(str(out), batch_size=2, **data)).train_dataset
    for rank in (0, 1):
        expected = []
        for epoch in (0, 1):
            order = read_order(str(out), 2, rank, epoch, batch_size=2)
            for k, batch in enumerate(np.array_split(order, 3)):
                sums = [float(dataset[int(i)][0].double().sum()) for i in batch]
                expected.append((epoch, k, [dataset.targets[i] for i in batch], sums))
        trained = stopped[rank] + resumed[rank]
        assert [b[:2] for b in stopped[rank]] == [(0, 0), (0, 1)]
        assert [b[:3] for b in trained] == [b[:3] for b in expected], f"rank {rank}"
        assert np.allclose([b[3] for b in trained], [b[3] for b in expected], rtol=1e-6), f"rank {rank}"


def test_two_gloo_processes_read_the_dataset_once_in_a_lightning_fit(shards, tmp_path):
    import torch as _torch

    from tests.conftest import callback_args, run_finegrained

    _, out = shards
    recipe = _shard_fit_recipe(tmp_path / "shards.yaml", out, num_workers=0, resize_size=36, crop_size=32)
    run_finegrained(["fit", "--config", recipe, "--trainer.default_root_dir", str(tmp_path / "run"),
                     "--checkpoint.dirpath", str(tmp_path / "ck"),
                     *callback_args("SaveReadIndicesPerRank", folder=str(tmp_path / "read"))], timeout=300)
    for epoch in (0, 1):
        parts = [_torch.load(tmp_path / "read" / f"epoch{epoch}_rank{r}.pt") for r in (0, 1)]
        assert sorted(parts[0] + parts[1]) == list(range(12)) and len(parts[0]) == len(parts[1]) == 6


def test_huggingface_images_decode_as_files_do(tmp_path, caplog):
    """Rows are decoded by datamodules.io: an unreadable row names split and row (skip_corrupt skips it), and a
    16-bit grey image is scaled to 8 bits, as for image files."""
    import io
    import logging

    import datasets
    import numpy as np
    from PIL import Image

    from datamodules import HuggingFaceDataModule, ImageLoadError

    grey16 = np.array([[0, 257 * 10], [65535, 257 * 200]], dtype=np.uint16).repeat(20, 0).repeat(20, 1)
    buffer = io.BytesIO()
    Image.fromarray(grey16).save(buffer, format="PNG")
    good = io.BytesIO()
    Image.fromarray(np.full((40, 40, 3), 90, np.uint8)).save(good, format="PNG")
    images = [{"bytes": good.getvalue(), "path": None}, {"bytes": b"not an image", "path": None},
              {"bytes": buffer.getvalue(), "path": None}]
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["a", "b"])})
    split = datasets.Dataset.from_dict({"image": images, "label": [0, 1, 0]}, features=features)
    datasets.DatasetDict({"train": split, "test": split}).save_to_disk(str(tmp_path / "saved"))
    dm = _setup(HuggingFaceDataModule(str(tmp_path / "saved"), **SMALL))
    assert np.array_equal(np.asarray(dm.train_dataset.load_image(2))[:, :, 0][::20, ::20], [[0, 10], [255, 200]])
    with pytest.raises(ImageLoadError, match=r"saved \[train\] row 1: not a readable image.*skip_corrupt"):
        dm.train_dataset[1]
    skipping = _setup(HuggingFaceDataModule(str(tmp_path / "saved"), skip_corrupt=True, **SMALL))
    caplog.set_level(logging.WARNING)
    image, label = skipping.train_dataset[1]
    assert label == 0 and "[train] row 1 (" in caplog.text and "skip_corrupt: skipping" in caplog.text
