"""TwoStageFinetuning: its settings, every group's learning rate per epoch, and a backbone frozen in stage 1 only,
on one process and under DDP, frozen or on cached features (resuming it: tests/test_resume.py)."""
from types import SimpleNamespace

import pytest
import torch

from finegrained.callbacks import TwoStageFinetuning


@pytest.mark.parametrize("settings, message", [({"route": "sideways"}, "stage1 route must be one of frozen, cached, got 'sideways'"),
                                               ({"batch_size": 0}, "batch_size must be >= 1"),
                                               ({"lr": -1.0}, "stage1 lr must be >= 0, got -1.0"),
                                               ({"epochs": -1}, "epochs must be >= 0")])
def test_settings_are_checked_when_built(settings, message):
    with pytest.raises(ValueError, match=message):
        TwoStageFinetuning(**settings)


def test_a_stage_1_as_long_as_the_fit_is_said(recwarn):
    trainer = SimpleNamespace(max_epochs=3, strategy=object())
    TwoStageFinetuning(epochs=3).setup(trainer, None, "fit")
    assert any("backbone is frozen for the whole fit" in str(w.message) for w in recwarn.list)
    recwarn.clear()
    TwoStageFinetuning(epochs=2).setup(trainer, None, "fit")
    TwoStageFinetuning(epochs=3, route="cached").setup(trainer, None, "fit")  # cached: every epoch is stage 2
    assert not [w for w in recwarn.list if "frozen for the whole fit" in str(w.message)]


def _two_stage_lrs(scheduler, epochs=6, stage1=2, lr_steps=(2,)):
    from finegrained.optim import configure_optimizers

    from finegrained.callbacks import TwoStageFinetuning
    from finegrained.optim import OptimSettings

    parts = {name: torch.nn.Linear(2, 2) for name in ("backbone", "head", "classifier")}
    settings = OptimSettings(optimizer="sgd", lr=1e-3, momentum=0.9, weight_decay=5e-4, scheduler=scheduler,
                             lr_steps=list(lr_steps), lr_gamma=0.1)
    config = configure_optimizers(parts, settings, epochs, stage1=TwoStageFinetuning(epochs=stage1, lr=1.0))
    opt, sched = config["optimizer"], config["lr_scheduler"]["scheduler"]
    lrs = []
    for _ in range(epochs):
        lrs.append({g["name"]: g["lr"] for g in opt.param_groups})
        opt.step()
        sched.step()
    return lrs


def test_two_stage_learning_rate_of_every_group_per_epoch():
    import math

    stage1 = {"backbone": 0.0, "head": 1.0, "classifier": 1.0}
    base = {"backbone": 1e-3, "head": 1e-3, "classifier": 5e-3}
    scaled = lambda f: {k: v * f for k, v in base.items()}  # noqa: E731
    expected_step = [stage1, stage1, base, base, scaled(0.1), scaled(0.1)]
    expected_constant = [stage1, stage1, base, base, base, base]
    expected_cosine = [stage1, stage1] + [scaled(0.5 * (1 + math.cos(math.pi * k / 4))) for k in range(4)]
    for got, expected in ((_two_stage_lrs("step"), expected_step), (_two_stage_lrs("constant"), expected_constant),
                          (_two_stage_lrs("cosine"), expected_cosine)):
        for epoch, (g, e) in enumerate(zip(got, expected)):
            assert g == pytest.approx(e), (epoch, g, e)


def _stage_model(tmp_path):
    import torchvision

    from finegrained.model import FineGrainedClassifier
    from finegrained.optim import OptimSettings

    weights = tmp_path / "pretrained.pth"
    torch.save(torchvision.models.resnet18().state_dict(), weights)
    model = FineGrainedClassifier(num_classes=3, backbone="resnet18", backbone_weights=str(weights), last_stride=1,
                                  head="isqrt", head_kwargs={"reduction": 8}, optim=OptimSettings(lr=0.01))
    return model, {k: v.clone() for k, v in model.backbone.state_dict().items()}


def test_stage1_keeps_every_backbone_tensor_also_with_mid_epoch_validation(tmp_path, image_folder):
    import pytorch_lightning as pl

    from datamodules import ImageFolderDataModule
    from finegrained.callbacks import TwoStageFinetuning

    dm = ImageFolderDataModule(image_folder, batch_size=2, num_workers=0, resize_size=72, crop_size=64)
    for epochs, changes in ((1, False), (2, True)):
        model, pretrained = _stage_model(tmp_path)
        trainer = pl.Trainer(max_epochs=epochs, val_check_interval=0.5, num_sanity_val_steps=0, accelerator="cpu",
                             logger=False, enable_checkpointing=False, enable_progress_bar=False,
                             enable_model_summary=False, callbacks=[TwoStageFinetuning(epochs=1, lr=0.1)])
        trainer.fit(model, dm)
        after = model.backbone.state_dict()
        same = [k for k in pretrained if torch.equal(after[k], pretrained[k])]
        if changes:  # stage 2 trains the backbone: the check above can fail
            assert len(same) < len(pretrained)
        else:
            assert same == list(pretrained), f"changed in stage 1: {sorted(set(pretrained) - set(same))[:5]}"


def test_two_stage_fit_runs_under_ddp_and_switches_to_stage_2(trained_run, tmp_path):
    import sys

    import torchvision

    from tests.conftest import run_finegrained

    if not sys.platform.startswith("linux"):
        pytest.skip("gloo DDP test written for Linux")
    recipe, _, data = trained_run
    weights = tmp_path / "pretrained.pth"
    torch.save(torchvision.models.mobilenet_v2().state_dict(), weights)  # a small backbone: the fit only switches
    run_finegrained([
        "fit", "--config", recipe, "--model.backbone", "mobilenet_v2", "--model.backbone_weights", str(weights),
        "--stage1.epochs", "1",
        "--stage1.lr", "0.1", "--trainer.max_epochs", "2", "--trainer.strategy", "ddp", "--trainer.devices", "2",
        "--trainer.accelerator", "cpu", "--trainer.default_root_dir", str(tmp_path), "--checkpoint.dirpath",
        str(tmp_path / "ck"), "--checkpoint.save_top_k", "-1", "--checkpoint.monitor", "null",
        "--checkpoint.filename", "{epoch}", "--checkpoint.save_last", "false"])
    pretrained = torch.load(weights, weights_only=True)
    for epoch, changed in ((0, False), (1, True)):
        state = torch.load(tmp_path / "ck" / f"epoch={epoch}.ckpt", weights_only=True)["state_dict"]
        backbone = {k[len("network.backbone."):]: v for k, v in state.items() if k.startswith("network.backbone.")}
        differs = [k for k, v in backbone.items() if not torch.equal(v, pretrained[k])]
        assert bool(differs) == changed, (epoch, differs[:3])


def test_cached_stage1_trains_the_classifier_on_unaugmented_features_and_every_rank_gets_it(trained_run, tmp_path):
    import sys

    from tests.conftest import callback_args, run_finegrained

    if not sys.platform.startswith("linux"):
        pytest.skip("gloo DDP test written for Linux")
    recipe, _, _ = trained_run
    out = run_finegrained([
        "fit", "--config", recipe, *callback_args("SaveHeadPerRank", folder=str(tmp_path / "states")),
        "--model.head", "gap", "--model.head_kwargs", "{}",
        "--stage1.route", "cached", "--stage1.epochs", "20", "--stage1.lr", "0.5",
        "--stage1.batch_size", "4", "--trainer.max_epochs", "1", "--trainer.strategy", "ddp",
        "--trainer.devices", "2", "--trainer.accelerator", "cpu", "--trainer.default_root_dir", str(tmp_path),
        "--checkpoint.dirpath", str(tmp_path / "ck")])
    assert __import__("re").search(r"stage 1 on cached features: \d+ images, 512-d, 20 epochs at lr 0.5",
                                   out.stdout + out.stderr)
    rank0, rank1 = (torch.load(tmp_path / "states" / f"classifier_rank{r}.pt", weights_only=True) for r in (0, 1))
    for key in rank0:
        torch.testing.assert_close(rank0[key], rank1[key], rtol=0, atol=0)
    assert rank0["1.weight"].abs().max() > 0.05  # trained: the fresh 512 -> 3 layer starts within ±1/√512 = 0.044
