"""Every published-protocol recipe: it parses, states its protocol, and runs one step on a tiny replica."""
import glob
import os

import pytest
import yaml

from finegrained.cli import main
from finegrained.cli.recipe import expand_config_args, load_recipe
from tests.conftest import REPO_ROOT
from tests.replicas import (write_aircraft, write_cars, write_cub, write_dogs, write_flowers, write_food101,
                            write_inaturalist, write_nabirds, write_pets)

RECIPES = sorted(glob.glob(os.path.join(REPO_ROOT, "recipes", "*", "*.yaml")))
RECIPES = [os.path.relpath(p) for p in RECIPES if "_base" not in p]
# The further fine-grained sets: iSQRT-COV and GAP with ResNet-50 each (no published number in the reference file).
MORE_DATASETS = {"nabirds": "datamodules.NABirdsDataModule", "dogs": "datamodules.StanfordDogsDataModule",
                 "flowers102": "datamodules.Flowers102DataModule", "pets": "datamodules.OxfordIIITPetDataModule",
                 "food101": "datamodules.Food101DataModule", "inat2021_mini": "datamodules.INaturalistDataModule"}
MORE_ROWS = ["isqrt_resnet50", "gap_resnet50"]
DATASETS = ("cub", "aircraft", "cars")
ROWS = ["isqrt_resnet50", "cbp_resnet50", "kp_resnet50", "gap_resnet50", "mpncov_vgg16", "netvlad_vgg16",
        "cbp_vgg16", "kp_vgg16", "lrbp_vgg16", "improved_bcnn_vgg16", "g2de_vgg16", "hihca_vgg16", "netfv_vgg16",
        "bcnn_vgg16", "gap_vgg16", "isqrt_resnet101", "gap_resnet101",
        # After the tutorial: iSICE (its paper's rows), MPA-Lya, and the timm backbones with four heads.
        "isice_resnet50", "isice_vgg16", "mpa_resnet50"] + [
        f"{head}_{backbone}" for head in ("gap", "isqrt", "sot", "dropcov") for backbone in ("convnext-t", "vit-s16")]


def test_one_recipe_per_row_and_dataset():
    names = {os.path.relpath(p, "recipes") for p in RECIPES}
    assert names == {f"{d}/{r}.yaml" for d in DATASETS for r in ROWS} | {
        f"{d}/{r}.yaml" for d in MORE_DATASETS for r in MORE_ROWS}


DATAMODULES = {"cub": "datamodules.CUB200DataModule", "aircraft": "datamodules.FGVCAircraftDataModule",
               "cars": "datamodules.StanfordCarsDataModule", **MORE_DATASETS}
# row method -> (head, backbone family): the tutorial's "MPN-COV" VGG row is iSQRT-COV on VGG-16 with BN.
HEAD_OF_ROW = {"mpncov": "isqrt"}
BACKBONE_OF_ROW = {("mpncov", "vgg16"): "vgg16_bn", ("isice", "vgg16"): "vgg16_bn",
                   **{(head, "convnext-t"): "timm/convnext_tiny" for head in ("gap", "isqrt", "sot", "dropcov")},
                   **{(head, "vit-s16"): "timm/vit_small_patch16_224" for head in ("gap", "isqrt", "sot", "dropcov")}}
IN_CHANNELS = {"vgg16": 512, "vgg16_bn": 512, "resnet50": 2048, "resnet101": 2048}


def _reference_rows():
    import pandas as pd
    table = pd.read_csv(os.path.join(REPO_ROOT, "results", "reference.csv"))
    return table[table["metric"] == "top1_acc"]


@pytest.mark.parametrize("recipe", RECIPES)
def test_recipe_states_the_published_protocol(recipe):
    """The recipe's dataset, head, backbone, representation size and paper number are those of its table row."""
    from finegrained.heads import build_head

    merged = load_recipe(recipe)
    model, trainer, data = merged["model"], merged["trainer"], merged["data"]
    for key in ("backbone", "backbone_weights", "last_stride", "head", "head_kwargs", "test_flip"):
        assert key in model, f"{recipe}: model.{key} is not stated"
    for key in ("optimizer", "lr", "lr_mult", "weight_decay", "scheduler"):
        assert key in model["optim"], f"{recipe}: model.optim.{key} is not stated"
    assert trainer["max_epochs"] > 0 and data["init_args"]["batch_size"] > 0
    dataset = recipe.split(os.sep)[-2]
    method, backbone = os.path.basename(recipe)[:-len(".yaml")].rsplit("_", 1)
    assert data["class_path"] == DATAMODULES[dataset]
    assert model["head"] == HEAD_OF_ROW.get(method, method)
    assert model["backbone"] == BACKBONE_OF_ROW.get((method, backbone), backbone)
    with open(recipe) as f:
        header = [line for line in f if line.startswith("#")]
    assert any("Protocol" in line for line in header)
    paper = [line for line in header if line.startswith("# Paper top-1:")]
    assert len(paper) == 1, f"{recipe}: one 'Paper top-1' line expected"
    rows = _reference_rows()
    rows = rows[(rows["method"] == method) & (rows["backbone"] == backbone) & (rows["dataset"] == dataset)]
    if rows.empty:  # a baseline the tutorial does not report
        assert paper[0].startswith("# Paper top-1: none"), f"{recipe}: no reference row, yet {paper[0]!r}"
        return
    stated = float(paper[0].split(":")[1].split()[0])
    assert stated in set(rows["value"]), f"{recipe}: header says {stated}, results/reference.csv {sorted(rows['value'])}"
    size = rows["dim"].dropna()
    size = size[size.str.endswith("K")]  # the dim column also names model variants ("[D,D]")
    if len(size):  # the tutorial's "32K", "263K": the representation, rounded as the tutorial rounds (K = 1,000 or 1,024)
        head = build_head(model["head"], IN_CHANNELS[model["backbone"]], num_classes=200, **model["head_kwargs"])
        dim = model["head_kwargs"]["reduction"] ** 2 if head.produces_logits else head.output_dim  # LRBP: r×r map
        thousands = float(size.iloc[0].rstrip("K"))
        assert min(abs(dim / 1000 - thousands), abs(dim / 1024 - thousands)) < 1, f"{recipe}: {dim} vs {size.iloc[0]}"


def test_recipe_bases_merge_recursively(tmp_path):
    (tmp_path / "a.yaml").write_text("model: {lr: 1.0, head: gap}\ntrainer: {max_epochs: 3}\n")
    (tmp_path / "b.yaml").write_text("base: [a.yaml]\nmodel: {lr: 2.0}\n")
    (tmp_path / "c.yaml").write_text("base: b.yaml\nmodel: {head: bcnn}\n")
    assert load_recipe(str(tmp_path / "c.yaml")) == {"model": {"lr": 2.0, "head": "bcnn"}, "trainer": {"max_epochs": 3}}
    expanded = expand_config_args(["fit", "--config", str(tmp_path / "c.yaml"), "--trainer.max_epochs", "1"])
    assert yaml.safe_load(expanded[2])["model"]["head"] == "bcnn" and expanded[3:] == ["--trainer.max_epochs", "1"]
    (tmp_path / "loop.yaml").write_text("base: [loop.yaml]\n")
    with pytest.raises(ValueError, match="cycle"):
        load_recipe(str(tmp_path / "loop.yaml"))
    (tmp_path / "orphan.yaml").write_text("base: [missing.yaml]\n")
    with pytest.raises(FileNotFoundError, match="missing.yaml"):
        load_recipe(str(tmp_path / "orphan.yaml"))


@pytest.mark.parametrize("recipe", RECIPES)
def test_recipe_print_config(recipe, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", recipe, "--print_config"])
    assert exit_info.value.code in (None, 0)
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["head"] == load_recipe(recipe)["model"]["head"]


@pytest.fixture(scope="module")
def replicas(tmp_path_factory):
    root = tmp_path_factory.mktemp("replicas")
    return {"cub": write_cub(str(root / "cub"), n_classes=3, per_class=2),
            "aircraft": write_aircraft(str(root / "aircraft"), variants=["707-320", "A300B4", "F/A-18"], n_images=9),
            "cars": write_cars(str(root / "cars"), classes=["A 2012", "B 2012", "C/D 2012"], n_train=6, n_test=3)[0],
            "nabirds": write_nabirds(str(root / "nabirds"), per_class=2), "dogs": write_dogs(str(root / "dogs")),
            "flowers102": write_flowers(str(root / "flowers")), "pets": write_pets(str(root / "pets"), per_class=2),
            "food101": write_food101(str(root / "food"), per_class=2),
            "inat2021_mini": write_inaturalist(str(root / "inat"), "2021_mini", per_class=2)}


@pytest.mark.parametrize("recipe", RECIPES)
def test_recipe_runs_one_step(recipe, replicas, tmp_path):
    dataset = recipe.split(os.sep)[-2]
    # A data-dependent initialisation (k-means to 64 centres, PCA to 100 channels) needs more descriptors
    # than 3 replica images give at 64 px: 128 px gives 64 positions per image on VGG-16.
    side = 128 if "data_init" in load_recipe(recipe) else 64
    assert main(["fit", "--config", recipe, "--trainer.fast_dev_run", "1", "--trainer.accelerator", "cpu",
                 "--model.backbone_weights", "null", "--data.init_args.root", replicas[dataset],
                 "--data.init_args.resize_size", str(side + 8), "--data.init_args.crop_size", str(side),
                 "--data.init_args.batch_size", "2", "--data.init_args.num_workers", "0",
                 "--trainer.default_root_dir", str(tmp_path), "--runs_csv", str(tmp_path / "runs.csv")]) == 0


def test_the_own_folder_recipe_writes_apart_from_the_demo_and_fits(image_folder, tmp_path):
    own, demo = load_recipe("recipes/my_folder.yaml"), load_recipe("recipes/demo.yaml")
    paths = lambda r: {r["runs_csv"], r["trainer"]["default_root_dir"], r["checkpoint"]["dirpath"]}  # noqa: E731
    assert paths(own) == {"runs/my/runs.csv", "runs/my", "runs/my/checkpoints"}
    assert not paths(own) & paths(demo)
    assert own["data"]["class_path"] == "datamodules.ImageFolderDataModule"
    assert main(["fit", "--config", "recipes/my_folder.yaml", "--data.init_args.root", image_folder,
                 "--data.init_args.resize_size", "72", "--data.init_args.crop_size", "64",
                 "--data.init_args.num_workers", "0", "--model.backbone", "resnet18", "--model.backbone_weights",
                 "null", "--trainer.fast_dev_run", "1", "--trainer.default_root_dir", str(tmp_path),
                 "--checkpoint.dirpath", str(tmp_path / "ck"), "--runs_csv", str(tmp_path / "runs.csv")]) == 0
