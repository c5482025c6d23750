"""Where the weights come from: the authors' checkpoints, init_from, and load_from_checkpoint offline."""
import logging

import pytest
import torch

from finegrained.cli import main
from finegrained.model import FineGrainedClassifier, load_classifier
from tests.conftest import make_image_folder


def _authors_resnet_file(path, backbone="resnet50", reduction=256, prefix=""):
    """A state dict in fast-MPN-COV's iSQRT-COV ResNet layout: trunk, layer_reduce, layer_reduce_bn, fc."""
    import torchvision

    g = torch.Generator().manual_seed(0)
    trunk = {k: v for k, v in getattr(torchvision.models, backbone)().state_dict().items() if not k.startswith("fc.")}
    channels = 2048 if backbone in ("resnet50", "resnet101") else 512
    dim = reduction * (reduction + 1) // 2
    state = {**trunk,
             "layer_reduce.weight": torch.randn(reduction, channels, 1, 1, generator=g),
             "layer_reduce_bn.weight": torch.rand(reduction, generator=g) + 0.5,
             "layer_reduce_bn.bias": torch.randn(reduction, generator=g),
             "layer_reduce_bn.running_mean": torch.randn(reduction, generator=g),
             "layer_reduce_bn.running_var": torch.rand(reduction, generator=g) + 0.5,
             "layer_reduce_bn.num_batches_tracked": torch.tensor(1234),
             "fc.weight": torch.randn(1000, dim, generator=g), "fc.bias": torch.zeros(1000)}
    torch.save({prefix + k: v for k, v in state.items()}, path)
    return state


@pytest.mark.parametrize("prefix", ["", "module."])
def test_authors_isqrt_resnet50_checkpoint_starts_backbone_and_reduction(tmp_path, caplog, prefix):
    import logging

    from finegrained.model import FineGrainedClassifier

    path = tmp_path / "mpncovresnet50-15991845.pth"
    state = _authors_resnet_file(path, prefix=prefix)
    caplog.set_level(logging.INFO)
    model = FineGrainedClassifier(num_classes=5, backbone="resnet50", backbone_weights=str(path), last_stride=1,
                                  head="isqrt", head_kwargs={"reduction": 256})
    backbone = model.backbone.features.state_dict()
    for key in ("conv1.weight", "layer4.2.conv3.weight", "layer4.2.bn3.running_var"):
        torch.testing.assert_close(backbone[key], state[key], rtol=0, atol=0)
    head = model.head.state_dict()
    torch.testing.assert_close(head["reduce.0.weight"], state["layer_reduce.weight"], rtol=0, atol=0)
    for name in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
        torch.testing.assert_close(head[f"reduce.1.{name}"], state[f"layer_reduce_bn.{name}"], rtol=0, atol=0)
    assert model.classifier[-1].weight.shape == (5, 32896)
    logged = " ".join(r.getMessage() for r in caplog.records)
    assert "fast-MPN-COV iSQRT-COV ResNet" in logged and "head.reduce.0, head.reduce.1" in logged
    assert "dropped fc.weight, fc.bias" in logged


def test_authors_checkpoint_with_a_head_without_that_reduction_keeps_the_trunk(tmp_path, caplog):
    import logging

    from finegrained.model import FineGrainedClassifier

    path = tmp_path / "mpncovresnet18.pth"
    state = _authors_resnet_file(path, backbone="resnet18", reduction=8)
    caplog.set_level(logging.INFO)
    model = FineGrainedClassifier(num_classes=3, backbone="resnet18", backbone_weights=str(path), last_stride=1,
                                  head="gap")
    torch.testing.assert_close(model.backbone.features.state_dict()["conv1.weight"], state["conv1.weight"])
    assert any("reduction dropped" in r.getMessage() for r in caplog.records)


def test_a_file_of_another_layout_is_a_clear_error(tmp_path):
    from finegrained.model import FineGrainedClassifier

    path = tmp_path / "broken.pth"
    state = _authors_resnet_file(path, backbone="resnet18", reduction=8)
    del state["layer_reduce.weight"]
    torch.save(state, path)
    with pytest.raises(ValueError, match=r"iSQRT-COV ResNet checkpoint .* lack \['layer_reduce.weight'\]"):
        FineGrainedClassifier(num_classes=3, backbone="resnet18", backbone_weights=str(path), head="isqrt",
                              head_kwargs={"reduction": 8})


def test_authors_mpncov_vgg16_bn_checkpoint(tmp_path, caplog):
    import logging

    import torchvision

    from finegrained.model import FineGrainedClassifier

    g = torch.Generator().manual_seed(0)
    features = {k: v for k, v in torchvision.models.vgg16_bn().state_dict().items() if k.startswith("features.")}
    state = {**features, "representation.conv_dr_block.0.weight": torch.randn(256, 512, 1, 1, generator=g),
             "representation.conv_dr_block.1.weight": torch.rand(256, generator=g),
             "representation.conv_dr_block.1.bias": torch.randn(256, generator=g),
             "representation.conv_dr_block.1.running_mean": torch.randn(256, generator=g),
             "representation.conv_dr_block.1.running_var": torch.rand(256, generator=g) + 0.5,
             "representation.conv_dr_block.1.num_batches_tracked": torch.tensor(7),
             "classifier.weight": torch.randn(1000, 32896, generator=g), "classifier.bias": torch.zeros(1000)}
    path = tmp_path / "mpncovvgg16_bn.pth"
    torch.save(state, path)
    caplog.set_level(logging.INFO)
    model = FineGrainedClassifier(num_classes=4, backbone="vgg16_bn", backbone_weights=str(path), head="isqrt",
                                  head_kwargs={"reduction": 256})
    torch.testing.assert_close(model.backbone.features[40].weight, state["features.40.weight"], rtol=0, atol=0)
    torch.testing.assert_close(model.head.reduce[1].running_var, state["representation.conv_dr_block.1.running_var"])
    assert any("VGG-16-BN" in r.getMessage() and "dropped classifier.weight" in r.getMessage() for r in caplog.records)


def test_init_from_drops_a_classifier_of_another_size(trained_run, caplog):
    _, ckpt, _ = trained_run
    source = load_classifier(ckpt)
    caplog.set_level(logging.INFO)
    model = FineGrainedClassifier(num_classes=5, backbone="resnet18", backbone_weights=None, last_stride=1,
                                  head="isqrt", head_kwargs={"reduction": 16}, init_from=ckpt)
    printed = caplog.text
    assert "dropped classifier.1.weight (3, 136)" in printed and "dropped classifier.1.bias (3,)" in printed
    assert printed.count("dropped classifier.1.weight") == 1  # through logging, once
    assert model.dropped_from_init == ["classifier.1.bias", "classifier.1.weight"]
    torch.testing.assert_close(model.backbone.state_dict()["features.conv1.weight"],
                               source.backbone.state_dict()["features.conv1.weight"])
    torch.testing.assert_close(model.head.state_dict()["reduce.0.weight"], source.head.state_dict()["reduce.0.weight"])


def test_init_from_through_the_cli(trained_run, tmp_path, caplog):
    recipe, ckpt, _ = trained_run
    other = make_image_folder(tmp_path / "four", n_classes=4, per_class=3)
    caplog.set_level(logging.INFO)
    assert main(["fit", "--config", recipe, "--trainer.fast_dev_run", "true", "--model.init_from", ckpt,
                 "--data.init_args.root", other, "--trainer.default_root_dir", str(tmp_path)]) == 0
    assert caplog.text.count("dropped classifier.1.weight") == 1


def test_cli_test_does_not_read_init_from_again(trained_run, tmp_path):
    """A fine-tuned checkpoint records init_from; LightningCLI takes it from the checkpoint when testing."""
    import shutil

    from finegrained.cli import main

    recipe, ckpt, _ = trained_run
    start = tmp_path / "start.ckpt"
    shutil.copy(ckpt, start)
    run = ["--config", recipe, "--trainer.default_root_dir", str(tmp_path), "--checkpoint.dirpath", str(tmp_path / "ck"),
           "--runs_csv", ""]
    assert main(["fit", *run, "--model.init_from", str(start), "--trainer.max_epochs", "1"]) == 0
    fine_tuned = tmp_path / "ck" / "last.ckpt"
    assert torch.load(fine_tuned, weights_only=True)["hyper_parameters"]["init_from"] == str(start)
    start.unlink()
    assert main(["test", *run, "--ckpt_path", str(fine_tuned)]) == 0


def test_load_from_checkpoint_reads_neither_pretrained_weights_nor_init_from(tmp_path, monkeypatch, image_folder):
    import urllib.error

    import pytorch_lightning as pl
    import torchvision

    from datamodules import ImageFolderDataModule
    from finegrained.model import FineGrainedClassifier

    weights = tmp_path / "r18.pth"
    torch.save(torchvision.models.resnet18().state_dict(), weights)
    first = FineGrainedClassifier(num_classes=3, backbone="resnet18", backbone_weights=str(weights), head="gap")
    start = tmp_path / "start.ckpt"
    torch.save({"hyper_parameters": dict(first.hparams), "state_dict": first.state_dict()}, start)
    model = FineGrainedClassifier(num_classes=3, backbone="resnet18", backbone_weights=str(weights), head="gap",
                                  init_from=str(start))
    dm = ImageFolderDataModule(image_folder, batch_size=4, num_workers=0, resize_size=72, crop_size=64)
    trainer = pl.Trainer(max_epochs=1, limit_train_batches=1, limit_val_batches=1, accelerator="cpu", logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(model, dm)
    ckpt = tmp_path / "trained.ckpt"
    model.hparams.backbone_weights = "imagenet"  # as a recipe records it
    trainer.save_checkpoint(ckpt)
    weights.unlink()
    start.unlink()

    def no_network(*args, **kwargs):
        raise urllib.error.URLError("offline")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty_cache"))
    loaded = FineGrainedClassifier.load_from_checkpoint(ckpt)
    for key, value in model.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[key], value)
    assert loaded.hparams.backbone_weights == "imagenet" and loaded.hparams.init_from == str(start)  # as recorded
