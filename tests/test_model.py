"""FineGrainedClassifier: parts, optimiser groups, flip averaging, a fast_dev_run fit."""
import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F

from datamodules import ImageFolderDataModule
from finegrained.cli import main
from finegrained.model import FineGrainedClassifier, load_classifier
from finegrained.optim import OptimSettings


OPTIM_KEYS = ("optimizer", "lr", "momentum", "lr_mult", "weight_decay", "weight_decay_mult", "scheduler", "lr_steps",
              "lr_gamma")


def tiny_model(**kwargs):
    defaults = dict(num_classes=3, backbone="resnet18", backbone_weights=None, last_stride=1, head="isqrt",
                    head_kwargs={"reduction": 8})
    optim = {key: kwargs.pop(key) for key in OPTIM_KEYS if key in kwargs}
    return FineGrainedClassifier(**{**defaults, **kwargs}, optim=OptimSettings(**optim))


def test_the_classifier_computes_what_its_network_computes():
    model = tiny_model().eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        by_hand = model.network.classifier(model.network.head(model.network.backbone(x)))
        torch.testing.assert_close(model(x), by_hand)
    assert by_hand.shape == (2, 3) and model.network.head.output_dim == 36  # 8 channels: 8·9/2 = 36


def test_hyperparameters_are_saved_as_plain_data():
    model = tiny_model(lr=0.5, weight_decay=1e-3, scheduler="step", lr_steps=[2], label_smoothing=0.1)
    assert model.hparams.optim == {"optimizer": "sgd", "lr": 0.5, "momentum": 0.9, "lr_mult": None,
                                   "weight_decay": 1e-3, "weight_decay_mult": None, "scheduler": "step",
                                   "lr_steps": [2], "lr_gamma": 0.1}
    assert model.hparams.label_smoothing == 0.1 and model.hparams.head_kwargs == {"reduction": 8}
    # What a checkpoint holds is rebuilt from itself (weights_only=True refuses a dataclass).
    rebuilt = FineGrainedClassifier(**{k: v for k, v in model.hparams.items()})
    assert rebuilt.optim == model.optim


def test_parameter_groups_use_lr_multipliers():
    model = tiny_model(lr=0.1)
    groups = {g["name"]: g for g in model.parameter_groups()}
    assert groups["backbone"]["lr"] == pytest.approx(0.1)
    assert groups["head"]["lr"] == pytest.approx(0.1)
    assert groups["classifier"]["lr"] == pytest.approx(0.5)  # ×5 by default, as in iSQRT-COV fine-tuning
    n_params = sum(len(g["params"]) for g in groups.values())
    assert n_params == len(list(model.parameters()))
    custom = {g["name"]: g for g in tiny_model(lr=1.0, lr_mult={"backbone": 0.1}).parameter_groups()}
    assert custom["backbone"]["lr"] == pytest.approx(0.1) and custom["classifier"]["lr"] == pytest.approx(5.0)


def test_frozen_parameters_are_left_out_of_the_optimiser():
    model = tiny_model()
    for p in model.backbone.parameters():
        p.requires_grad_(False)
    assert [g["name"] for g in model.parameter_groups()] == ["head", "classifier"]


def test_flip_averaging():
    model = tiny_model(test_flip=True).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = 0.5 * (model(x) + model(torch.flip(x, dims=[3])))
        torch.testing.assert_close(model.predict_logits(x), expected)
        model.hparams.test_flip = False
        torch.testing.assert_close(model.predict_logits(x), model(x))


@pytest.mark.parametrize("bad", [{"optimizer": "rmsprop"}, {"scheduler": "poly"}, {"lr_mult": {"neck": 2.0}},
                                 {"class_names": ["a", "b"]}])
def test_bad_settings_are_refused(bad):
    with pytest.raises(ValueError):
        tiny_model(**bad)


def test_top5_only_with_enough_classes():
    assert "val_top5" not in tiny_model(num_classes=3).val_metrics.keys(keep_base=False)
    assert "val_top5" in tiny_model(num_classes=6).val_metrics.keys(keep_base=False)


def test_fast_dev_run_fit_and_test_on_image_folder(image_folder):
    dm = ImageFolderDataModule(image_folder, batch_size=4, num_workers=0, resize_size=72, crop_size=64)
    model = tiny_model(num_classes=dm.num_classes, class_names=dm.class_names, scheduler="cosine")
    trainer = pl.Trainer(fast_dev_run=True, accelerator="cpu", enable_progress_bar=False, logger=False)
    trainer.fit(model, dm)
    metrics = trainer.test(model, dm, verbose=False)[0]
    assert {"test_top1", "test_mean_class_acc", "test_loss"} <= set(metrics)
    # fast_dev_run tests one batch: the same batch through the network by hand, logits of the image and
    # its flip averaged (test_flip), gives the logged accuracy, loss and the confusion matrix's count.
    images, labels = next(iter(dm.test_dataloader()))
    model.eval()
    with torch.no_grad():
        logits = (model(images) + model(torch.flip(images, dims=[3]))) / 2
    assert metrics["test_top1"] == pytest.approx(float((logits.argmax(1) == labels).float().mean()), abs=1e-6)
    assert metrics["test_loss"] == pytest.approx(float(F.cross_entropy(logits, labels)), rel=1e-5)
    assert model.tested_images == len(labels) == 4


def test_load_classifier_round_trip(trained_run):
    _, ckpt, _ = trained_run
    model = load_classifier(ckpt)
    assert model.hparams.class_names == ["class_0", "class_1", "class_2"]
    assert model.hparams.preprocessing["crop"] == 64
    checkpoint = torch.load(ckpt, weights_only=True)
    torch.testing.assert_close(model.classifier[1].weight, checkpoint["state_dict"]["network.classifier.1.weight"])


def test_load_classifier_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.ckpt"):
        load_classifier(str(tmp_path / "missing.ckpt"))
    bogus = tmp_path / "bogus.ckpt"
    torch.save({"weights": torch.zeros(1)}, bogus)
    with pytest.raises(ValueError, match="not a FineGrainedClassifier checkpoint"):
        load_classifier(str(bogus))


def test_backbone_finetuning_callback_works(image_folder):
    """Lightning's BackboneFinetuning freezes `model.backbone`, then adds it to the optimiser."""
    from pytorch_lightning.callbacks import BackboneFinetuning

    dm = ImageFolderDataModule(image_folder, batch_size=4, num_workers=0, resize_size=72, crop_size=64)
    model = tiny_model(num_classes=dm.num_classes)
    before = model.backbone.features.conv1.weight.detach().clone()
    trainer = pl.Trainer(max_epochs=2, limit_train_batches=2, limit_val_batches=1, accelerator="cpu",
                         enable_progress_bar=False, logger=False, enable_checkpointing=False,
                         callbacks=[BackboneFinetuning(unfreeze_backbone_at_epoch=1)])
    trainer.fit(model, dm)
    groups = trainer.optimizers[0].param_groups
    # BackboneFinetuning keeps BN trainable (train_bn=True), so the backbone group starts with BN only;
    # the frozen convolutions arrive in a group of their own at epoch 1.
    assert [g.get("name") for g in groups][:3] == ["backbone", "head", "classifier"] and len(groups) == 4
    conv1 = model.backbone.features.conv1.weight
    assert not any(p is conv1 for p in groups[0]["params"]) and any(p is conv1 for p in groups[3]["params"])
    assert not torch.equal(before, model.backbone.features.conv1.weight)


def test_logit_head_is_the_classifier():
    model = tiny_model(num_classes=4, head="lrbp", head_kwargs={"reduction": 8, "rank": 2}).eval()
    assert isinstance(model.classifier, torch.nn.Identity)
    assert model.head.num_classes == 4
    assert model(torch.randn(2, 3, 64, 64)).shape == (2, 4)
    assert {g["name"] for g in model.parameter_groups()} == {"backbone", "head"}


def test_head_aux_loss_is_added_to_the_training_loss():
    model = tiny_model(head="gmsop", head_kwargs={"components": 4, "top_k": 2, "mid_channels": 8,
                                                  "out_channels": 4}, label_smoothing=0.0)
    model.train()
    images, labels = torch.randn(4, 3, 64, 64), torch.tensor([0, 1, 2, 0])
    logged = {}
    model.log = lambda name, value, **kw: logged.__setitem__(name, value)
    torch.manual_seed(0)
    loss = model.training_step((images, labels), 0)
    aux = logged["train_aux_loss"]
    assert aux.item() > 0  # random gating over 4 images is not perfectly balanced
    # Same seed, same noise: the loss is the cross-entropy of the same forward plus the aux loss.
    torch.manual_seed(0)
    logits = model(images)
    torch.testing.assert_close(loss, torch.nn.functional.cross_entropy(logits, labels) + model.head.aux_loss)


def test_short_fit_under_bf16_mixed_on_cpu(trained_run, tmp_path):
    recipe, _, _ = trained_run
    assert main(["fit", "--config", recipe, "--trainer.precision", "bf16-mixed", "--trainer.max_epochs", "1",
                 "--trainer.default_root_dir", str(tmp_path), "--checkpoint.dirpath", str(tmp_path / "ck")]) == 0
    model = load_classifier(str(tmp_path / "ck" / "last.ckpt"))
    assert all(torch.isfinite(p).all() for p in model.parameters())
