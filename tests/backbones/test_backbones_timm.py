"""timm backbones (random init and local weight files, offline) and module backbones."""
import os

import pytest
import torch
from torch import nn

from finegrained.backbones import WeightsUnavailableError, available_backbones, build_backbone
from finegrained.model import FineGrainedClassifier

VIT = "timm/vit_small_patch16_224"


def test_registry_lists_timm_families_and_explains_them():
    names = available_backbones()
    assert {"timm:convnext", "timm:vision_transformer", "timm:swin_transformer"} <= set(names)
    assert "resnet50" in names
    with pytest.raises(ValueError, match="timm/convnext_"):
        build_backbone("timm:convnext")
    with pytest.raises(ValueError, match="vit_small_patch16_224"):
        build_backbone("timm/vit_smal_patch16_224")


def test_vit_patch_tokens_as_a_map_and_its_class_token():
    torch.manual_seed(0)
    backbone = build_backbone(VIT).eval()
    x = torch.randn(2, 3, 224, 224)
    assert backbone.out_channels == 384 and backbone.class_token_dim == 384
    feature_map = backbone(x)
    assert feature_map.shape == (2, 384, 14, 14)
    tokens = backbone.features.model.forward_features(x)  # (B, 1 + 196, 384), after the final norm
    torch.testing.assert_close(feature_map.flatten(2).transpose(1, 2), tokens[:, 1:])
    backbone.return_class_token = True
    feature_map_again, class_token = backbone(x)
    torch.testing.assert_close(class_token, tokens[:, 0])
    torch.testing.assert_close(feature_map_again, feature_map)
    assert backbone(torch.randn(1, 3, 448, 448))[0].shape == (1, 384, 28, 28)  # dynamic_img_size
    with pytest.raises(ValueError, match="output_stride"):
        build_backbone(VIT, last_stride=1)


def test_convnext_map_and_output_stride():
    backbone = build_backbone("timm/convnext_tiny")
    assert backbone.out_channels == 768 and backbone.class_token_dim == 0
    assert backbone(torch.randn(1, 3, 224, 224)).shape == (1, 768, 7, 7)
    assert build_backbone("timm/convnext_tiny", last_stride=1)(torch.randn(1, 3, 224, 224)).shape == (1, 768, 14, 14)
    with pytest.raises(ValueError, match="no class token"):
        backbone.return_class_token = True


def test_swin_nhwc_output_becomes_nchw():
    backbone = build_backbone("timm/swin_tiny_patch4_window7_224").eval()
    x = torch.randn(1, 3, 224, 224)
    out = backbone(x)
    assert out.shape == (1, 768, 7, 7)
    torch.testing.assert_close(out, backbone.features.model.forward_features(x).permute(0, 3, 1, 2))


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_local_weight_file_in_timm_names(tmp_path, suffix):
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(1)
    full = timm.create_model("vit_small_patch16_224", num_classes=1000).eval()  # timm's own names, with its head
    path = str(tmp_path / f"vit_s{suffix}")
    save_file(full.state_dict(), path) if suffix == ".safetensors" else torch.save(full.state_dict(), path)
    backbone = build_backbone(VIT, weights=path).eval()
    x = torch.randn(1, 3, 224, 224)
    torch.testing.assert_close(backbone(x).flatten(2).transpose(1, 2), full.forward_features(x)[:, 1:])


def test_weight_file_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothere.safetensors"):
        build_backbone(VIT, weights=str(tmp_path / "nothere.safetensors"))
    wrong = tmp_path / "wrong.pth"
    torch.save({"foo": torch.zeros(1)}, wrong)
    with pytest.raises(WeightsUnavailableError, match="do not fit timm/convnext_tiny"):
        build_backbone("timm/convnext_tiny", weights=str(wrong))
    with pytest.raises(ValueError, match="no pretrained tag"):
        build_backbone(VIT, weights="not_a_tag")


def test_imagenet_offline_names_what_to_download(monkeypatch, tmp_path):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # fail at once, as offline does
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(WeightsUnavailableError) as err:
        build_backbone("timm/resnet18", weights="imagenet")
    message = str(err.value)
    assert "https://huggingface.co/timm/resnet18." in message and "model.safetensors" in message
    assert str(tmp_path / "hub") in message and "--model.backbone_weights" in message


class TinyBackbone(nn.Module):
    out_channels = 8

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, stride=4)

    def forward(self, x):
        return self.conv(x)


def test_any_module_with_out_channels_is_a_backbone(tmp_path):
    model = FineGrainedClassifier(4, backbone=TinyBackbone(), head="isqrt", head_kwargs={"reduction": 6})
    assert model.hparams.backbone == "module:TinyBackbone" and model.hparams.backbone_weights is None
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 4)
    path = tmp_path / "m.ckpt"
    torch.save({"state_dict": model.state_dict(), "hyper_parameters": dict(model.hparams),
                "pytorch-lightning_version": "2.6.0"}, path)
    loaded = FineGrainedClassifier.load_from_checkpoint(str(path), backbone=TinyBackbone())
    torch.testing.assert_close(loaded.backbone.features.conv.weight, model.backbone.features.conv.weight)
    with pytest.raises(ValueError, match="out_channels"):
        build_backbone(nn.ReLU())


def test_sot_on_vit_gets_the_class_token_and_others_do_not():
    torch.manual_seed(0)
    sot = FineGrainedClassifier(5, backbone=VIT, backbone_weights=None, head="sot")
    assert sot.backbone.return_class_token and sot.head.output_dim == 3456 + 384
    assert sot.classifier[-1].weight.std() < 0.03  # SoT's trunc_normal(0.02), not PyTorch's default
    x = torch.randn(2, 3, 64, 64)
    assert sot(x).shape == (2, 5)
    isqrt = FineGrainedClassifier(5, backbone=VIT, backbone_weights=None, head="isqrt")
    assert not isqrt.backbone.return_class_token and isqrt(x).shape == (2, 5)
    on_cnn = FineGrainedClassifier(5, backbone="timm/convnext_tiny", backbone_weights=None, head="sot")
    assert on_cnn.head.output_dim == 3456 and on_cnn(x).shape == (2, 5)  # visual tokens only


def test_timm_fit_with_bf16_and_channels_last_through_the_cli(trained_run, tmp_path):
    """The user's path: LightningCLI fit + test with a timm ViT and SoT under bf16 autocast, channels_last."""
    from finegrained.cli import main

    recipe, _, _ = trained_run
    common = ["--config", recipe, "--model.backbone", VIT, "--model.backbone_weights", "null",
              "--model.last_stride", "2", "--model.head", "sot", "--model.head_kwargs", "{heads: 2, rank: 8}",
              "--model.channels_last", "true", "--trainer.precision", "bf16-mixed",
              "--trainer.default_root_dir", str(tmp_path)]
    assert main(["fit", *common, "--trainer.fast_dev_run", "1"]) == 0
    assert os.path.isdir(tmp_path)


def test_channels_last_converts_the_backbone_and_the_batches():
    model = FineGrainedClassifier(3, backbone="timm/convnext_tiny", backbone_weights=None, head="gap",
                                  channels_last=True)
    assert model.backbone.features.model.stem[0].weight.is_contiguous(memory_format=torch.channels_last)
    images = model.network.in_memory_format(torch.randn(2, 3, 32, 32))
    assert images.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("backbone,head", [(VIT, "sot"), ("timm/convnext_tiny", "dropcov")])
def test_timm_classifiers_export_to_onnx_and_torchscript(backbone, head, tmp_path):
    from finegrained.export import export_classifier

    torch.manual_seed(0)
    preprocessing = {"resize": 72, "crop": 64, "mean": [0.5] * 3, "std": [0.5] * 3, "interpolation": "bilinear"}
    model = FineGrainedClassifier(3, backbone=backbone, backbone_weights=None, head=head,
                                  class_names=["a", "b", "c"], preprocessing=preprocessing)
    ckpt = str(tmp_path / "m.ckpt")
    torch.save({"hyper_parameters": dict(model.hparams), "state_dict": model.state_dict()}, ckpt)
    for fmt, suffix in (("onnx", ".onnx"), ("torchscript", ".pt")):
        manifest = export_classifier(ckpt, fmt, str(tmp_path / f"m{suffix}"))
        assert manifest["parity_max_abs_diff"] <= 1e-4, (fmt, manifest["parity_max_abs_diff"])


def test_a_weight_file_missing_a_tensor_is_refused_not_loaded_in_part(tmp_path):
    """timm loads non-strictly once the classifier is dropped; the keys its load_state_dict reports are errors."""
    import timm

    state = timm.create_model("convnext_tiny", num_classes=1000).state_dict()
    missing = next(k for k in state if k.startswith("stages.3"))
    del state[missing]
    state["extra.weight"] = torch.zeros(1)
    path = tmp_path / "partial.pth"
    torch.save(state, path)
    with pytest.raises(WeightsUnavailableError, match=rf"Missing keys \({missing}\).*Unexpected keys \(extra.weight\)"):
        build_backbone("timm/convnext_tiny", weights=str(path))
