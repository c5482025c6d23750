"""Every recipe trains what its paper trained, and every reported number is the model's own."""
import pytest
import torch
from torch.autograd import gradgradcheck

from finegrained.ops import eig_log, eig_power, isqrt_cov, sqrtm_newton_schulz_lyapunov, sqrtm_pade


# ---- double backward is never silently wrong ----------------------------------------------------------
def _spd(b=2, d=4):
    x = torch.randn(b, d, 3 * d, dtype=torch.float64)
    return (x @ x.transpose(1, 2) / (3 * d) + 0.1 * torch.eye(d, dtype=torch.float64)).requires_grad_(True)


@pytest.mark.parametrize("name, fn, make", [
    ("isqrt", lambda t: isqrt_cov(t, 3), lambda: torch.randn(2, 4, 9, dtype=torch.float64, requires_grad=True)),
    ("eig_power", lambda s: eig_power(s, 0.5), _spd),
    ("eig_log", lambda s: eig_log(s, 1e-3), _spd),
    ("lyapunov", lambda s: sqrtm_newton_schulz_lyapunov(s, 5, 5), _spd),
    ("mpa_lya", lambda s: sqrtm_pade(s, "mpa"), _spd),
])
def test_double_backward_is_refused_not_wrong(name, fn, make):
    with pytest.raises(RuntimeError, match="differentiate twice"):
        gradgradcheck(fn, (make(),))


# ---- GM-SOP gating as in the official gate layer --------------------------------------------------------
def test_gmsop_training_breaks_gate_ties_at_random():
    """From the paper's constant initialisation every gate logit ties; training must still use all components."""
    from finegrained.heads import build_head

    torch.manual_seed(0)
    head = build_head("gmsop", 16, mid_channels=8, out_channels=4).train()
    selected = torch.zeros(16, dtype=torch.bool)
    for _ in range(20):
        head(torch.randn(8, 16, 5, 5).relu())
        assert (head.last_gates > 0).sum(1).eq(8).all()  # still exactly K = 8 per image
        selected |= (head.last_gates > 0).any(0)
    assert selected.all(), f"components never selected: {(~selected).nonzero().flatten().tolist()}"


def test_gmsop_evaluation_keeps_the_deterministic_tie_rule():
    from finegrained.heads import build_head

    head = build_head("gmsop", 16, mid_channels=8, out_channels=4).eval()
    x = torch.randn(4, 16, 5, 5).relu()
    head(x)
    first = head.last_gates.clone()
    head(x)
    assert torch.equal(first, head.last_gates)
    assert torch.equal((first > 0).nonzero()[:, 1].view(4, 8), torch.arange(8).expand(4, 8))  # ties -> lowest indices


# ---- the training crop of each protocol -------------------------------------------------------------
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

    return load_recipe(os.path.join(os.path.dirname(__file__), "..", "recipes", path))


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


# ---- FineGrainedClassifier.load_from_checkpoint works offline ------------------------------------------
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


# ---- the exported model is the tested model ---------------------------------------------------------------
@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_export_includes_the_flip_average_of_finegrained_test(fmt, tmp_path):
    from finegrained.export import export_classifier
    from finegrained.model import load_classifier
    from finegrained.predict import ExportedModel
    from tests.heads.test_heads_end_to_end import head_checkpoint

    ckpt = head_checkpoint("isqrt", str(tmp_path))
    out = str(tmp_path / f"m.{fmt}")
    manifest = export_classifier(ckpt, fmt, out)
    assert manifest["output"]["flip_averaged"] is True
    images = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = load_classifier(ckpt).predict_logits(images).numpy()
        unflipped = load_classifier(ckpt)(images).numpy()
    exported = ExportedModel(out)(images)
    assert abs(exported - expected).max() <= 1e-4
    assert abs(unflipped - expected).max() > 1e-3  # the flip matters on these inputs, so the check can fail


def test_predict_images_decodes_exactly_like_the_test_loader(trained_run, tmp_path):
    """Large JPEGs are draft-decoded by the loaders; predict-images must do the same."""
    import numpy as np
    from PIL import Image

    from datamodules import ImageFolderDataModule
    from finegrained.export import export_classifier
    from finegrained.predict import ExportedModel

    _, ckpt, _ = trained_run
    rng = np.random.default_rng(0)
    for split in ("train", "val", "test"):
        for c in range(3):
            folder = tmp_path / "big" / split / f"class_{c}"
            folder.mkdir(parents=True)
            pixels = rng.integers(0, 255, (600, 800, 3), dtype=np.uint8)
            Image.fromarray(pixels).resize((1600, 1200)).save(folder / "photo.jpg", quality=90)
    dm = ImageFolderDataModule(str(tmp_path / "big"), batch_size=2, num_workers=0, resize_size=72, crop_size=64)
    dm.setup("test")
    out = str(tmp_path / "m.pt")
    export_classifier(ckpt, "torchscript", out)
    model = ExportedModel(out)
    for index, (path, _) in enumerate(dm.test_dataset.samples):
        torch.testing.assert_close(model.preprocess(path), dm.test_dataset[index][0], rtol=0, atol=0)


_debian_fashion = pytest.mark.skipif(
    not __import__("os").path.isfile("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz"),
    reason="Debian package dataset-fashion-mnist is not installed (make setup installs it as root)")


@_debian_fashion
def test_labelled_folder_accuracy_equals_finegrained_test_on_the_demo_images(tmp_path, capsys):
    import os
    import re

    from finegrained.cli import main

    demo = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "recipes", "demo.yaml"))
    recipe = tmp_path / "small_demo.yaml"
    recipe.write_text(f"base: [{demo}]\ndata:\n  init_args: {{subset_per_class: 3, val_per_class: 1, "
                      f"test_per_class: 6, image_size: 48}}\n")
    small = ["--config", str(recipe), "--trainer.default_root_dir", str(tmp_path),
             "--checkpoint.dirpath", str(tmp_path / "ck"), "--runs_csv", ""]
    assert main(["fit", *small, "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "1"]) == 0
    ckpt = str(tmp_path / "ck" / "last.ckpt")
    capsys.readouterr()
    assert main(["test", *small, "--ckpt_path", ckpt]) == 0
    tested = re.search(r"Test accuracy on 60 images: top-1 ([0-9.]+), .*mean per-class ([0-9.]+)", capsys.readouterr().out)
    samples = str(tmp_path / "labelled")
    assert main(["data", "samples", "--config", str(recipe), "--split", "test", "--n", "60", "--by-class",
                 "--out", samples]) == 0
    onnx = str(tmp_path / "m.onnx")
    assert main(["export", "--ckpt", ckpt, "--format", "onnx", "--out", onnx]) == 0
    capsys.readouterr()
    assert main(["predict-images", "--model", onnx, samples, "--topk", "1"]) == 0
    predicted = re.search(r"Accuracy on 60 labelled images: top-1 ([0-9.]+), mean per-class ([0-9.]+)",
                          capsys.readouterr().out)
    assert tested and predicted, "both commands print their accuracy"
    assert predicted.groups() == tested.groups()


# ---- the two-stage protocol: one implementation, works on several processes -------------------------------
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
    torch.save(torchvision.models.resnet18().state_dict(), weights)
    run_finegrained([
        "fit", "--config", recipe, "--model.backbone_weights", str(weights), "--stage1.epochs", "1",
        "--stage1.lr", "0.1", "--trainer.max_epochs", "2", "--trainer.strategy", "ddp", "--trainer.devices", "2",
        "--trainer.accelerator", "cpu", "--trainer.default_root_dir", str(tmp_path), "--checkpoint.dirpath",
        str(tmp_path / "ck"), "--checkpoint.save_top_k", "-1", "--checkpoint.monitor", "null",
        "--checkpoint.filename", "{epoch}", "--checkpoint.save_last", "false"])
    pretrained = torch.load(weights, weights_only=True)
    for epoch, changed in ((0, False), (1, True)):
        state = torch.load(tmp_path / "ck" / f"epoch={epoch}.ckpt", weights_only=True)["state_dict"]
        backbone = {k[len("network.backbone.features."):]: v for k, v in state.items()
                    if k.startswith("network.backbone.features.")}
        differs = [k for k, v in backbone.items() if not torch.equal(v, pretrained[k])]
        assert bool(differs) == changed, (epoch, differs[:3])


# ---- honest checkpoint choice --------------------------------------------------------------------------------
@pytest.mark.parametrize("val_fraction, best_written, validation", [(0.0, False, "test set"), (0.5, True, "held-out")])
def test_checkpoint_choice_is_honest(val_fraction, best_written, validation, trained_run, tmp_path, capsys):
    import csv

    from finegrained.cli import main
    from tests.replicas import write_cub

    recipe, _, _ = trained_run
    cub = write_cub(str(tmp_path / "cub"), n_classes=3, per_class=4)
    run = ["--config", recipe, "--data", "datamodules.CUB200DataModule", "--data.init_args.root", cub,
           "--data.init_args.val_fraction", str(val_fraction), "--data.init_args.batch_size", "2",
           "--data.init_args.resize_size", "72", "--data.init_args.crop_size", "64", "--data.init_args.num_workers", "0",
           "--trainer.default_root_dir", str(tmp_path), "--checkpoint.dirpath", str(tmp_path / "ck"),
           "--runs_csv", str(tmp_path / "runs.csv")]
    assert main(["fit", *run, "--trainer.max_epochs", "2"]) == 0
    assert (tmp_path / "ck" / "best.ckpt").exists() == best_written
    ckpt = tmp_path / "ck" / ("best.ckpt" if best_written else "last.ckpt")
    capsys.readouterr()
    assert main(["test", *run, "--ckpt_path", str(ckpt)]) == 0
    printed = capsys.readouterr().out
    selection = "best val_top1" if best_written else "last epoch"
    assert f"Checkpoint: {selection}; validation: {validation}" in printed
    (row,) = list(csv.DictReader(open(tmp_path / "runs.csv")))
    assert row["validation"] == validation and row["selection"] == selection


def test_older_run_records_gain_the_new_columns(tmp_path):
    from finegrained.results.runs import RUN_FIELDS, append_run, read_runs

    old = [f for f in RUN_FIELDS if f not in ("validation", "selection")]
    path = tmp_path / "runs.csv"
    path.write_text(",".join(old) + "\n" + ",".join("x" for _ in old) + "\n")
    append_run(str(path), {"method": "isqrt", "validation": "held-out", "selection": "last epoch"})
    runs = read_runs(str(path))
    assert list(runs.columns) == RUN_FIELDS and len(runs) == 2
    assert runs["selection"].fillna("").tolist() == ["", "last epoch"]


# ---- data-dependent initialisation runs in fit -------------------------------------------------------------
def _fit_netvlad(recipe, tmp_path, *extra):
    from finegrained.cli import main

    run = ["--config", recipe, "--model.head", "netvlad", "--model.head_kwargs", '{"clusters": 8}', "--model.optim.lr", "0",
           "--trainer.default_root_dir", str(tmp_path), "--checkpoint.dirpath", str(tmp_path / "ck"), "--runs_csv", ""]
    assert main(["fit", *run, *extra]) == 0
    return torch.load(tmp_path / "ck" / "last.ckpt", weights_only=True)["state_dict"]


def test_fit_initialises_netvlad_centroids_by_kmeans(trained_run, tmp_path, caplog):
    """Backbone features after ReLU are non-negative, so k-means centres are; the random init is not."""
    import logging

    recipe, _, _ = trained_run
    caplog.set_level(logging.INFO)
    state = _fit_netvlad(recipe, tmp_path, "--trainer.max_epochs", "1")
    centroids = state["network.head.centroids"]
    assert (centroids >= -1e-6).all(), "centroids are not k-means centres of post-ReLU descriptors"
    assert any("k-means (8 centres)" in r.getMessage() for r in caplog.records)
    weight = state["network.head.assign.weight"].flatten(1)  # w_k = 2α c_k: tied to the centroids by one positive factor
    factor = (weight * centroids).sum() / centroids.square().sum()
    assert factor > 0 and torch.allclose(weight, factor * centroids, atol=1e-5)


def test_data_init_is_skipped_when_resuming_or_starting_from_a_checkpoint(trained_run, tmp_path, caplog):
    import logging

    recipe, _, _ = trained_run
    first = _fit_netvlad(recipe, tmp_path / "a", "--trainer.max_epochs", "1")
    caplog.set_level(logging.INFO)
    resumed = _fit_netvlad(recipe, tmp_path / "a", "--trainer.max_epochs", "2", "--ckpt_path",
                           str(tmp_path / "a" / "ck" / "last.ckpt"), "--data_init.seed", "5")
    started = _fit_netvlad(recipe, tmp_path / "b", "--trainer.max_epochs", "1", "--model.init_from",
                           str(tmp_path / "a" / "ck" / "last.ckpt"), "--data_init.seed", "5")
    for state in (resumed, started):
        torch.testing.assert_close(state["network.head.centroids"], first["network.head.centroids"])  # lr 0: nothing moves
    skipped = [r.getMessage() for r in caplog.records if "data-dependent initialisation skipped" in r.getMessage()]
    assert len(skipped) == 2


def test_data_init_is_identical_on_every_ddp_rank(trained_run, tmp_path):
    import sys

    from tests.conftest import callback_args, run_finegrained

    if not sys.platform.startswith("linux"):
        pytest.skip("gloo DDP test written for Linux")
    recipe, _, _ = trained_run
    run_finegrained([
        "fit", "--config", recipe, *callback_args("SaveHeadPerRank", folder=str(tmp_path / "heads")),
        "--model.head", "netvlad", "--model.head_kwargs",
        '{"clusters": 8}', "--model.optim.lr", "0.01", "--trainer.max_epochs", "1", "--trainer.strategy", "ddp",
        "--trainer.devices", "2", "--trainer.accelerator", "cpu", "--trainer.default_root_dir", str(tmp_path),
        "--checkpoint.dirpath", str(tmp_path / "ck")])
    rank0, rank1 = (torch.load(tmp_path / "heads" / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    for key in rank0:
        torch.testing.assert_close(rank0[key], rank1[key], rtol=0, atol=0)
    assert (rank0["centroids"] >= -0.05).all()  # k-means centres (moved little by one epoch at lr 0.01)


# ---- start where the authors started --------------------------------------------------------------------------
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


# ---- the bench table chooses on validation, never on test ----------------------------------------------------
def test_bench_table_choices_do_not_depend_on_the_test_split():
    """Shuffled test labels change the test accuracy, never what was chosen or its validation accuracy."""
    from finegrained.bench.table import evaluate_head

    g = torch.Generator().manual_seed(0)
    centres = torch.randn(3, 6, 1, 1, generator=g) * 2

    def split(n):
        labels = torch.arange(n) % 3
        return (centres[labels] + torch.randn(n, 6, 3, 3, generator=g)).relu(), labels

    features = {"classes": ["a", "b", "c"]}
    for name, n in (("train", 60), ("val", 30), ("test", 30)):
        features[name], features[f"{name}_labels"] = split(n)
    shuffled = dict(features, test_labels=features["test_labels"][torch.randperm(30, generator=g)])
    for head in ("gap", "netvlad"):
        honest, blind = evaluate_head(head, features, epochs=1), evaluate_head(head, shuffled, epochs=1)
        assert honest["trained_by"] == blind["trained_by"] and honest["val_top1"] == blind["val_top1"]
        assert "validation_sweep" in honest and honest["validation_sweep"].count(":") >= 3


# ---- each recipe runs what the official training code runs ----===========================================
def test_cached_stage1_trains_the_classifier_on_unaugmented_features_and_every_rank_gets_it(trained_run, tmp_path):
    import sys

    from tests.conftest import callback_args, run_finegrained

    if not sys.platform.startswith("linux"):
        pytest.skip("gloo DDP test written for Linux")
    recipe, ckpt, _ = trained_run
    start = torch.load(ckpt, weights_only=True)["state_dict"]
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
    del start


def test_train_on_cached_features_learns_a_separable_problem():
    from finegrained.losses import loss_function
    from finegrained.optim import train_on_cached_features

    g = torch.Generator().manual_seed(0)
    labels = torch.arange(60) % 3
    features = (torch.eye(3)[labels] * 4 + torch.randn(60, 3, generator=g)).half()
    classifier = torch.nn.Linear(3, 3)
    first = loss_function("cross_entropy")(classifier(features.float()), labels).item()
    last = train_on_cached_features(classifier, features, labels, loss_function("cross_entropy"), epochs=30, lr=0.5,
                                    weight_decay=0.0, batch_size=16)
    assert last < 0.1 < first and (classifier(features.float()).argmax(1) == labels).float().mean() > 0.95


def test_weight_decay_and_learning_rate_per_part_and_per_head_parameter():
    from finegrained.model import FineGrainedClassifier
    from finegrained.optim import OptimSettings

    optim = OptimSettings(lr=1e-3, lr_mult={"classifier": 1000.0}, weight_decay=5e-4,
                          weight_decay_mult={"classifier": 0.0})
    model = FineGrainedClassifier(num_classes=3, backbone="vgg16", backbone_weights=None, head="hihca",
                                  head_kwargs={"filters": 16}, backbone_layers=["relu5_2", "relu5_3"], optim=optim)
    groups = {g["name"]: g for g in model.parameter_groups()}
    assert groups["head.layer_scales"]["lr"] == pytest.approx(1e-2) and groups["head"]["lr"] == pytest.approx(1e-3)
    assert groups["classifier"]["lr"] == pytest.approx(1.0) and groups["classifier"]["weight_decay"] == 0.0
    assert groups["backbone"]["weight_decay"] == groups["head"]["weight_decay"] == pytest.approx(5e-4)
    assert sum(len(g["params"]) for g in groups.values()) == len([p for p in model.parameters() if p.requires_grad])
    assert model.head.layer_scales.tolist() == [0.5, 1.0]
    with torch.no_grad():
        assert model(torch.randn(1, 3, 64, 64)).shape == (1, 3)


def test_stage1_weight_decay_applies_in_stage_1_only():
    from finegrained.optim import stage_weight_decay

    opt = torch.optim.SGD([{"params": [torch.nn.Parameter(torch.zeros(1))], "weight_decay": 5e-4}], lr=0.1)
    stage_weight_decay(opt, True, 0.0)
    assert opt.param_groups[0]["weight_decay"] == 0.0
    stage_weight_decay(opt, False, 0.0)
    assert opt.param_groups[0]["weight_decay"] == 5e-4


def test_one_vs_all_hinge_as_in_the_lrbp_code():
    from finegrained.losses import one_vs_all_hinge

    scores = torch.tensor([[2.0, 0.5, -3.0], [0.2, -0.9, 1.0]], requires_grad=True)
    labels = torch.tensor([0, 1])
    # image 0: true 2.0 -> 0; 0.5 -> 1.5 (not above 1.5: kept); -3 -> 0. image 1: 0.2 -> 1.2; -0.9 -> 1.9 > 1.5: 0.19;
    # 1.0 -> 2.0 > 1.5: 0.2.
    expected = (1.5 + 1.2 + 0.19 + 0.2) / 2
    loss = one_vs_all_hinge(scores, labels)
    assert loss.item() == pytest.approx(expected)
    loss.backward()
    assert scores.grad.flatten().tolist() == pytest.approx([0.0, 0.5, 0.0, 0.5, -0.05, 0.05])


def test_activation_gradients_are_clamped_not_parameter_gradients():
    from finegrained.callbacks.activation_clipping import clip_activation_gradients

    net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 1))
    clip_activation_gradients(net, 1.0)
    seen = {}

    def record(module, inputs, output):
        output.register_hook(lambda g: seen.setdefault("grad", g.clone()))

    net[0].register_forward_hook(record)
    x = 100 * torch.ones(1, 2)
    with torch.no_grad():
        net[0].weight.fill_(1.0)
        net[1].weight.fill_(10.0)
    (net(x) * 100).sum().backward()
    assert seen["grad"].abs().max() <= 1.0  # the layer output's derivative (1000 unclipped) arrives clamped
    # d loss / d W1 = (clamped derivative 1) × (layer-0 output 200): parameter gradients are not clipped
    assert net[1].weight.grad.abs().max() > 100.0


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


def test_svm_protocol_trains_one_vs_all_on_image_and_flip_and_averages_test_scores():
    import numpy as np
    from sklearn.svm import LinearSVC

    from finegrained.svm import svm_accuracy

    g = torch.Generator().manual_seed(0)

    class Stub(torch.nn.Module):
        """A network whose features are the images: image i is (D, 1, 2), its two views side by side, so the
        horizontal flip of head_features gives the second view."""

        def forward_features(self, images):
            return images[..., 0].flatten(1)

    def data(n):
        labels = torch.arange(n) % 6
        x = torch.randn(n, 2, 8, generator=g) + torch.nn.functional.one_hot(labels, 8)[:, None].float() * 1.5
        return x, labels

    class Views(torch.utils.data.Dataset):
        def __init__(self, x, labels):
            self.x, self.labels = x, labels

        def __len__(self):
            return len(self.labels)

        def __getitem__(self, i):
            return self.x[i].T[:, None, :], int(self.labels[i])  # (8, 1, 2)

    (train, train_labels), (test, test_labels) = data(60), data(30)
    result = svm_accuracy(Stub(), Views(train, train_labels), Views(test, test_labels))
    # head_features keeps features as float16 (memory): the reference starts from the same values.
    norm = lambda t: torch.nn.functional.normalize(t.half().float(), dim=-1).numpy()  # noqa: E731
    svm = LinearSVC(C=1.0, random_state=0).fit(norm(train.flatten(0, 1)), np.repeat(np.arange(60) % 6, 2))
    scores = (svm.decision_function(norm(test[:, 0])) + svm.decision_function(norm(test[:, 1]))) / 2
    assert result["top1"] == pytest.approx(float((scores.argmax(1) == np.arange(30) % 6).mean()))
    assert 0 <= result["mean_class_acc"] <= 1 and "top5" in result


def test_finegrained_test_svm_prints_and_records_both_classifiers(trained_run, tmp_path, capsys):
    import csv

    from finegrained.cli import main

    recipe, ckpt, _ = trained_run
    runs = tmp_path / "runs.csv"
    assert main(["test", "--config", recipe, "--ckpt_path", ckpt, "--svm", "true", "--runs_csv", str(runs)]) == 0
    printed = capsys.readouterr().out
    assert "Test accuracy on" in printed and "SVM accuracy on" in printed
    assert [row["classifier"] for row in csv.DictReader(open(runs))] == ["softmax", "svm"]


def test_svm_papers_are_compared_with_svm_runs_and_the_mixed_bcnn_row_is_marked(tmp_path):
    import os

    import pandas as pd

    from finegrained.results.runs import RUN_FIELDS
    from finegrained.results.tables import comparison, load_reference, write_tables

    reference = load_reference(os.path.join(os.path.dirname(__file__), "..", "results", "reference.csv"))
    rows = reference[(reference["table"] == "fgvc_comparison") & (reference["method"] == "bcnn")]
    assert set(rows["dim"]) == {"", "[D,D]"} and set(rows["classifier"]) == {"svm"}
    dd = rows[rows["dim"] == "[D,D]"].set_index("dataset")["value"].to_dict()
    assert dd == {"cub": 84.0, "aircraft": 84.1, "cars": 90.6}
    run = {f: "" for f in RUN_FIELDS}
    runs = pd.DataFrame([{**run, "recipe": "r", "dataset": "cars", "method": "bcnn", "backbone": "vgg16",
                          "head_dim": 262144, "top1": 0.90, "classifier": "softmax", "timestamp": "1"},
                         {**run, "recipe": "r", "dataset": "cars", "method": "bcnn", "backbone": "vgg16",
                          "head_dim": 262144, "top1": 0.91, "classifier": "svm", "timestamp": "2"}])
    ours = comparison(reference, runs, "fgvc_comparison").ours
    assert ours.loc[("bcnn", "vgg16", "[D,D]"), "cars"] == pytest.approx(91.0)  # the SVM run, not the softmax one
    write_tables(reference, runs, str(tmp_path))
    text = open(tmp_path / "fgvc_comparison.md").read()
    assert "| B-CNN†" in text and "asymmetric [D,M]" in text
