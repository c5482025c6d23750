"""Backbones: feature shapes, last_stride, weights handling (offline errors, state-dict paths)."""
import os
import urllib.error

import numpy as np
import pytest
import torch
from PIL import Image

from finegrained.backbones import (WeightsUnavailableError, available_backbones, build_backbone,
                                   efficientnet_lite0)
from tests.conftest import TINY_BACKBONE

EXPECTED_CHANNELS = {"resnet18": 512, "resnet34": 512, "resnet50": 2048, "resnet101": 2048, "resnet152": 2048,
                     "vgg16": 512, "vgg16_bn": 512, "densenet121": 1024, "densenet161": 2208, "densenet201": 1920,
                     "mobilenet_v2": 1280, "efficientnet_b0": 1280, "efficientnet_lite0": 1280}


def test_all_names_available():
    registered_by_the_tests = {TINY_BACKBONE}
    assert set(available_backbones(timm=False)) - registered_by_the_tests == set(EXPECTED_CHANNELS)
    assert {n for n in available_backbones() if not n.startswith("timm:")} - registered_by_the_tests == set(
        EXPECTED_CHANNELS)


@pytest.mark.parametrize("name", sorted(EXPECTED_CHANNELS))
def test_feature_shapes(name):
    backbone = build_backbone(name).eval()
    assert backbone.out_channels == EXPECTED_CHANNELS[name]
    with torch.no_grad():
        y = backbone(torch.randn(1, 3, 64, 64))
    side = 4 if name.startswith("vgg") else 2  # VGG stops at relu5_3 (stride 16), the rest at stride 32
    assert y.shape == (1, EXPECTED_CHANNELS[name], side, side)
    if not name.startswith("vgg"):
        stride1 = build_backbone(name, last_stride=1).eval()
        with torch.no_grad():
            assert stride1(torch.randn(1, 3, 64, 64)).shape == (1, EXPECTED_CHANNELS[name], 4, 4)


def test_resnet50_stride1_448_gives_28x28():
    backbone = build_backbone("resnet50", last_stride=1).eval()
    with torch.no_grad():
        assert backbone(torch.randn(1, 3, 448, 448)).shape == (1, 2048, 28, 28)


def test_vgg_last_stride_1_is_refused_clearly():
    with pytest.raises(ValueError, match="pool5"):
        build_backbone("vgg16", last_stride=1)


@pytest.mark.parametrize("name", ["vgg16", "vgg16_bn"])
def test_vgg_takes_torchvisions_full_state_dict_and_builds_no_classifier(name):
    """The backbone equals torchvision's VGG cut at relu5_3 with the same weights; random weights have torchvision's
    initialisation; a key that is neither a feature nor the classifier is still refused."""
    import torchvision

    full = torchvision.models.get_model(name, weights=None).eval()
    backbone = build_backbone(name, weights=full.state_dict()).eval()
    assert not [n for n, _ in backbone.named_parameters() if "classifier" in n]
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(backbone(x), full.features[:-1](x))
    random = build_backbone(name).features
    convs = [m for m in random.modules() if isinstance(m, torch.nn.Conv2d)]
    for conv in convs:  # Kaiming normal, fan-out: std sqrt(2 / (out_channels * 3 * 3)); zero bias
        expected = (2 / (conv.out_channels * 9)) ** 0.5
        assert abs(conv.weight.std().item() / expected - 1) < 0.1 and not conv.bias.any()
    foreign = {**full.state_dict(), "fc.weight": torch.zeros(1)}
    with pytest.raises(WeightsUnavailableError, match="1 unexpected keys"):
        build_backbone(name, weights=foreign)


def test_a_fine_tuned_classifier_is_left_out_and_a_reshaped_feature_is_named():
    """A state dict of a network fine-tuned on 3 classes gives its features; a feature tensor of another shape (VGG-16
    with BN weights for VGG-16, a changed kernel) is a WeightsUnavailableError naming the tensor, not torch's
    RuntimeError."""
    import torchvision

    full = torchvision.models.resnet18()
    full.fc = torch.nn.Linear(512, 3)
    backbone = build_backbone("resnet18", weights=full.state_dict())
    assert torch.equal(backbone.features.layer4[1].conv2.weight, full.layer4[1].conv2.weight)
    reshaped = {**full.state_dict(), "layer1.0.conv1.weight": torch.zeros(64, 64, 1, 1)}
    with pytest.raises(WeightsUnavailableError, match=r"layer1.0.conv1.weight is \(64, 64, 1, 1\), expected "
                                                      r"\(64, 64, 3, 3\)"):
        build_backbone("resnet18", weights=reshaped)
    with pytest.raises(WeightsUnavailableError, match="tensors of another shape"):
        build_backbone("vgg16", weights=torchvision.models.vgg16_bn().state_dict())
    with pytest.raises(WeightsUnavailableError, match=r"conv1.weight is a int, expected \(64, 3, 7, 7\)"):
        build_backbone("resnet18", weights={**full.state_dict(), "conv1.weight": 3})


def test_unknown_backbone_lists_known_names():
    with pytest.raises(ValueError, match="resnet50"):
        build_backbone("resnet9000")


def test_weights_from_state_dict_path(tmp_path):
    import torchvision

    full = torchvision.models.resnet18()
    path = tmp_path / "r18.pth"
    torch.save(full.state_dict(), path)
    backbone = build_backbone("resnet18", weights=str(path))
    torch.testing.assert_close(backbone.features.conv1.weight, full.conv1.weight)
    torch.testing.assert_close(backbone.features.layer4[1].conv2.weight, full.layer4[1].conv2.weight)


def test_weights_path_that_does_not_fit_is_refused(tmp_path):
    path = tmp_path / "wrong.pth"
    torch.save({"foo": torch.zeros(1)}, path)
    with pytest.raises(WeightsUnavailableError, match="do not fit resnet18"):
        build_backbone("resnet18", weights=str(path))


def test_missing_weights_path_names_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothere.pth"):
        build_backbone("resnet18", weights=str(tmp_path / "nothere.pth"))


def test_imagenet_offline_error_names_file_and_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))

    def no_network(url, dst, *args, **kwargs):
        raise urllib.error.URLError("no internet")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    with pytest.raises(WeightsUnavailableError) as err:
        build_backbone("resnet50", weights="imagenet")
    message = str(err.value)
    assert "resnet50-" in message and ".pth" in message
    assert os.path.join(str(tmp_path), "hub", "checkpoints") in message


def test_imagenet_weights_from_cache_are_used(tmp_path, monkeypatch):
    import torchvision

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    url = torchvision.models.get_model_weights("resnet18").DEFAULT.url
    cache = tmp_path / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    full = torchvision.models.resnet18()
    torch.save(full.state_dict(), cache / os.path.basename(url))
    backbone = build_backbone("resnet18", weights="imagenet")
    torch.testing.assert_close(backbone.features.conv1.weight, full.conv1.weight)


def _imagenet_input(image: np.ndarray) -> torch.Tensor:
    from datamodules.transforms import eval_transform, preprocessing_spec

    return eval_transform(preprocessing_spec(256, 224))(Image.fromarray(image))[None]


def test_offline_efficientnet_lite0_classifies_real_photos():
    skimage_data = pytest.importorskip("skimage.data")
    model = efficientnet_lite0("imagenet").eval()
    with torch.no_grad():
        cat = model(_imagenet_input(skimage_data.chelsea())).argmax(1).item()
        coffee = model(_imagenet_input(skimage_data.coffee())).argmax(1).item()
    assert 281 <= cat <= 285, f"chelsea classified as ImageNet class {cat}, expected a cat (281-285)"
    assert coffee == 967, f"coffee classified as ImageNet class {coffee}, expected 967 (espresso)"


def test_lite0_backbone_equals_pretrained_feature_extractor():
    full = efficientnet_lite0("imagenet").eval()
    backbone = build_backbone("efficientnet_lite0", weights="imagenet").eval()
    x = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        torch.testing.assert_close(backbone(x), full.extract_features(x))


def test_vgg_backbone_returns_the_layers_asked_for():
    from finegrained.backbones import build_backbone

    backbone = build_backbone("vgg16", layers=["relu5_2", "relu5_3"])
    assert backbone.out_channels == [512, 512]
    with pytest.raises(ValueError, match="no layer"):
        build_backbone("vgg16", layers=["relu9_9"])
    with pytest.raises(ValueError, match="network order"):
        build_backbone("vgg16", layers=["relu5_3", "relu5_2"])
    with pytest.raises(ValueError, match="cannot return layers"):
        build_backbone("resnet18", layers=["layer3"])
