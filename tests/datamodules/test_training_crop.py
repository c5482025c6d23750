"""The training crop: centre or random as each protocol's recipe sets it, random for a DataModule built in Python."""
import pytest
import torch

from tests.conftest import REPO_ROOT


def test_center_training_crop_is_the_test_crop_without_randomness():
    import numpy as np
    from PIL import Image

    from datamodules.transforms import eval_transform, preprocessing_spec, train_transform

    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (60, 90, 3), dtype=np.uint8))
    centre = train_transform(48, 40, hflip=False, train_crop="center")
    torch.testing.assert_close(centre(image), eval_transform(preprocessing_spec(48, 40))(image))
    random = train_transform(48, 40, hflip=False, train_crop="random")
    torch.manual_seed(0)
    crops = {tuple(random(image).flatten()[:50].tolist()) for _ in range(5)}
    assert len(crops) > 1
    with pytest.raises(ValueError, match="train_crop"):
        train_transform(48, 40, train_crop="middle")


def _merged(path):
    import os

    from finegrained.cli.recipe import load_recipe

    return load_recipe(os.path.join(REPO_ROOT, "recipes", path))


@pytest.mark.parametrize("dataset", ["cub", "aircraft", "cars"])
@pytest.mark.parametrize("recipe, crop", [("isqrt_resnet50", "center"), ("isqrt_resnet101", "center"),
                                          ("mpncov_vgg16", "center"), ("cbp_vgg16", "random"),
                                          ("cbp_resnet50", "random"), ("g2de_vgg16", "center"),
                                          ("hihca_vgg16", "center")])
def test_each_protocol_sets_its_training_crop(dataset, recipe, crop):
    assert _merged(f"{dataset}/{recipe}.yaml")["data"]["init_args"]["train_crop"] == crop


@pytest.mark.parametrize("dataset", ["cub", "aircraft", "cars"])
def test_the_benchmarks_published_input_is_in_their_data_recipe(dataset):
    """The protocol defaults live in one place, recipes/_base/data (the iSQRT-COV fine-tuning input)."""
    args = _merged(f"_base/data/{dataset}.yaml")["data"]["init_args"]
    assert args["train_crop"] == "center" and args["crop_size"] == 448 and args["batch_size"] == 10
    assert args["resize_size"] == {"cub": 448, "aircraft": [512, 512], "cars": [448, 448]}[dataset]


def test_a_datamodule_built_in_python_crops_at_random_by_default():
    import inspect

    import datamodules

    for module in ("CUB200DataModule", "FGVCAircraftDataModule", "StanfordCarsDataModule", "ImageFolderDataModule"):
        assert "train_crop" not in inspect.signature(getattr(datamodules, module).__init__).parameters
    assert inspect.signature(datamodules.FineGrainedDataModule.__init__).parameters["train_crop"].default == "random"
