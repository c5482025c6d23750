"""Every recipe against the official training code: settings as data (value + source), from
the official training code's files named below, compared with the merged recipe and with the optimiser the model builds.

Sources: FMC = jiangtaoxie/fast-MPN-COV (c430c78); BC = the B-CNN authors' MatConvNet code (tsungyu/bcnn);
UM = cvl-umass/bilinear-cnn; CB = gy20073/compact_bilinear_pooling (caffe-20160312/examples/compact_bilinear/);
MO = NEU-Gou/MoNet (derived G²DeNet code); HI = cssjcai/hihca (codes/); LR = aimerykong/Low-Rank-Bilinear-Pooling
(demo4_train_LRBP/). "chosen here" marks settings the official code does not give.
"""
import glob
import inspect
import math
import os

import pytest
import torch

from finegrained.cli.recipe import load_recipe
from tests.conftest import REPO_ROOT

RECIPES = os.path.join(REPO_ROOT, "recipes")
DATASETS = ("cub", "aircraft", "cars")

FMC, FMC_VGG = "FMC finetune.sh, main.py, imagepreprocess.py", "FMC finetune_mpncovvggd16.sh, main.py line 148"
BC, CB1, CB2 = "BC run_experiments_bcnn_train.m", "CB ft_last_layer.solver/.prototxt", "CB ft_all.solver/.prototxt"
MO, HI, LR = "MO script_run_exp.m, imdb_g2denet_train_dag.m", "HI hihca_main.m, getInitFCParams.m", \
    "LR main101_demo_posnegCoMatrixDecomp_bisvm.m"

IS = "IS iSICE README, train_iSICE_model.sh, main.py (docs/methods/isice.md)"
CHOSEN = "chosen here (recipes/_base/protocol/timm_finetune.yaml)"

# protocol -> {setting: (value, source)}. Settings are dotted paths into the merged recipe; "batch" is the
# effective batch of the main stage (batch_size × accumulate_grad_batches), "input/<dataset>" the (resize, crop).
PROTOCOLS = {
    "isqrt_resnet": {
        "model.optim.optimizer": ("sgd", FMC), "model.optim.momentum": (0.9, FMC), "model.optim.lr": (1.2e-3, FMC),
        "model.optim.lr_mult.classifier": (5.0, FMC), "model.optim.weight_decay": (1e-4, FMC), "model.optim.scheduler": ("constant", FMC),
        "trainer.max_epochs": (100, FMC), "batch": (10, FMC), "data.init_args.train_crop": ("center", FMC),
        "model.test_flip": (True, FMC), "stage1.epochs": (0, FMC), "model.last_stride": (1, FMC),
        "input/cub": ((448, 448), FMC), "input/aircraft": (([512, 512], 448), FMC), "input/cars": (([448, 448], 448), FMC),
    },
    "isqrt_vgg": {
        "model.optim.optimizer": ("sgd", FMC_VGG), "model.optim.lr": (3e-3, FMC_VGG), "model.optim.lr_mult.classifier": (20.0, FMC_VGG),
        "model.optim.weight_decay": (1e-4, FMC_VGG), "model.optim.weight_decay_mult.classifier": (1.0, FMC_VGG),
        "model.optim.scheduler": ("step", FMC_VGG), "model.optim.lr_steps": ([20], FMC_VGG), "model.optim.lr_gamma": (0.1, FMC_VGG),
        "trainer.max_epochs": (40, FMC_VGG), "batch": (10, FMC_VGG), "data.init_args.train_crop": ("center", FMC),
        "model.test_flip": (True, FMC), "stage1.epochs": (0, FMC_VGG),
        "input/cub": ((448, 448), FMC), "input/aircraft": (([512, 512], 448), FMC), "input/cars": (([448, 448], 448), FMC),
    },
    "bcnn_matconvnet": {
        "stage1.route": ("cached", BC + " (cached, un-augmented features)"), "stage1.epochs": (300, BC),
        "stage1.lr": (1.0, BC), "stage1.weight_decay": (0.0, BC), "stage1.batch_size": (256, BC),
        "model.optim.optimizer": ("sgd", BC), "model.optim.lr": (1e-3, BC), "model.optim.lr_mult.classifier": (1000.0, BC),
        "model.optim.weight_decay": (5e-4, BC), "model.optim.weight_decay_mult.classifier": (0.0, BC),
        "model.optim.scheduler": ("constant", BC), "trainer.max_epochs": (40, BC), "batch": (128, BC),
        "trainer.accumulate_grad_batches": (8, "chosen here: 16 × 8 = 128"), "data.init_args.train_crop": ("center", BC),
        "svm": (True, BC + ": SVM test"), "model.test_flip": (True, BC + ": image + flip scores"),
        "input/cub": ((448, 448), BC), "input/aircraft": (([512, 512], 448), BC), "input/cars": (([448, 448], 448), BC),
    },
    "cbp_caffe": {
        "stage1.route": ("frozen", CB1 + " (last layer on augmented images)"), "stage1.epochs": (320, CB1),
        "stage1.lr": (1.0, CB1), "stage1.lr_steps": ([107, 160, 213, 267], CB1),
        "stage1.lr_gamma": (0.25, CB1), "stage1.weight_decay": (5e-6, CB1),
        "stage1.init_std": (1e-4, CB1), "stage1.init_bias": (0.0, CB1),
        "model.optim.lr": (1e-3, CB2), "model.optim.lr_mult.classifier": (1.0, CB2), "model.optim.weight_decay": (5e-4, CB2),
        "model.optim.scheduler": ("constant", CB2), "trainer.max_epochs": (320 + 27, CB2), "batch": (8, CB2),
        "stage1_batch": (32, CB1 + ": batch 8 × iter_size 4"), "data.init_args.train_crop": ("random", CB2),
        "model.test_flip": (False, CB2 + ": centre crop, no flip"),
        "input/cub": (([512, 512], 448), CB2), "input/aircraft": (([512, 512], 448), CB2),
        "input/cars": (([512, 512], 448), CB2),
    },
    "g2de": {
        "stage1.route": ("cached", MO), "stage1.epochs": (300, MO), "stage1.lr": (1.0, MO),
        "stage1.weight_decay": (0.0, MO), "stage1.batch_size": (256, MO),
        "stage1.init_std": (0.001, MO), "stage1.init_bias": (0.1, MO),
        "model.optim.lr": (1e-3, MO), "model.optim.lr_mult.classifier": (1000.0, "BC, chosen here for G²DeNet"), "model.optim.weight_decay": (5e-4, MO),
        "model.optim.weight_decay_mult.classifier": (0.0, MO), "clip_activation_grad.bound": (1.0, "MO vl_GlbGaussian_nn.m"),
        "model.optim.scheduler": ("constant", MO), "trainer.max_epochs": (100, MO), "batch": (16, MO),
        "data.init_args.train_crop": ("center", MO), "input/cub": ((448, 448), MO), "input/aircraft": ((448, 448), MO),
        "input/cars": ((448, 448), MO),
    },
    "hihca": {
        "model.backbone_layers": (["relu5_2", "relu5_3"], "HI hihca_model_hc.m"),
        "stage1.route": ("cached", HI), "stage1.epochs": (300, "chosen here"),
        "stage1.lr": (1.0, "chosen here"), "stage1.weight_decay": (0.0, "chosen here"),
        "model.optim.lr": (1e-3, HI), "model.optim.scheduler": ("step", HI), "model.optim.lr_steps": ([10], HI),
        "model.optim.lr_gamma": (0.1, HI), "model.optim.weight_decay": (5e-4, HI), "trainer.max_epochs": (40, HI),
        "batch": (16, HI), "data.init_args.train_crop": ("center", HI), "svm": (True, "HI hihca_test.m"),
    },
    "lrbp": {
        "model.head_kwargs.reduction": (100, LR), "model.head_kwargs.rank": (8, LR),
        "model.head_kwargs.freeze_reduction": (True, LR), "model.loss": ("one_vs_all_hinge", LR + ", my_nnloss.m"),
        "model.optim.lr": (0.01, LR), "model.optim.scheduler": ("step", LR), "model.optim.lr_steps": ([150], LR),
        "model.optim.lr_gamma": (0.01, LR + ": 0.01 then 1e-4"), "trainer.max_epochs": (200, LR),
        "model.optim.weight_decay": (5e-4, LR), "batch": (16, LR), "data.init_args.train_crop": ("center", LR),
        "stage1.epochs": (0, LR),
    },
    "isice": {
        "model.optim.optimizer": ("adamw", IS), "model.optim.lr": (1.2e-4, IS), "model.optim.lr_mult.classifier": (5.0, IS),
        "model.optim.scheduler": ("step", IS), "model.optim.lr_steps": ([15, 30], IS), "model.optim.lr_gamma": (0.1, IS),
        "trainer.max_epochs": (100, IS), "batch": (65, IS), "model.test_flip": (True, IS),
        "model.head_kwargs.sparsity": (0.01, IS), "model.head_kwargs.step_size": (1.0, IS),
        "model.head_kwargs.steps": (5, IS), "model.head_kwargs.inverse_iterations": (7, IS),
        "model.head_kwargs.reduction": (256, IS),
    },
    "timm_finetune": {
        "model.optim.optimizer": ("adamw", CHOSEN), "model.optim.lr": (1e-4, CHOSEN), "model.optim.lr_mult.head": (10.0, CHOSEN),
        "model.optim.lr_mult.classifier": (10.0, CHOSEN), "model.optim.weight_decay": (0.05, CHOSEN),
        "model.optim.scheduler": ("cosine", CHOSEN), "trainer.max_epochs": (50, CHOSEN), "batch": (16, CHOSEN),
        "model.label_smoothing": (0.1, CHOSEN), "trainer.precision": ("bf16-mixed", CHOSEN),
        "model.backbone_weights": ("imagenet", CHOSEN), "model.last_stride": (2, CHOSEN),
    },
}

ROWS = {"bcnn_vgg16": "bcnn_matconvnet", "improved_bcnn_vgg16": "bcnn_matconvnet", "netvlad_vgg16": "bcnn_matconvnet",
        "netfv_vgg16": "bcnn_matconvnet", "cbp_vgg16": "cbp_caffe", "cbp_resnet50": "cbp_caffe", "kp_vgg16": "cbp_caffe",
        "kp_resnet50": "cbp_caffe", "g2de_vgg16": "g2de", "hihca_vgg16": "hihca", "lrbp_vgg16": "lrbp",
        "isqrt_resnet50": "isqrt_resnet", "isqrt_resnet101": "isqrt_resnet", "mpncov_vgg16": "isqrt_vgg",
        "gap_resnet50": "isqrt_resnet", "gap_resnet101": "isqrt_resnet", "gap_vgg16": "isqrt_vgg",
        "isice_resnet50": "isice", "isice_vgg16": "isice", "mpa_resnet50": "isqrt_resnet",
        **{f"{head}_{backbone}": "timm_finetune" for head in ("gap", "isqrt", "sot", "dropcov")
           for backbone in ("convnext-t", "vit-s16")}}
BACKBONES = {"mpncov_vgg16": "vgg16_bn"}


def _datamodule_default(merged, key):
    import datamodules

    cls = getattr(datamodules, merged["data"]["class_path"].split(".")[-1])
    for klass in cls.__mro__:
        parameter = inspect.signature(klass.__init__).parameters.get(key) if "__init__" in vars(klass) else None
        if parameter is not None and parameter.default is not inspect.Parameter.empty:
            return parameter.default
    raise KeyError(key)


def setting(merged, key, dataset):
    if key == "batch":
        return merged["data"]["init_args"]["batch_size"] * merged["trainer"].get("accumulate_grad_batches", 1)
    if key == "stage1_batch":
        scheduling = [c for c in merged["trainer"].get("callbacks", []) if c["class_path"].endswith("Scheduler")]
        return merged["data"]["init_args"]["batch_size"] * scheduling[0]["init_args"]["scheduling"][0]
    if key.startswith("input/"):
        args = merged["data"]["init_args"]
        resize = args.get("resize_size", _datamodule_default(merged, "resize_size"))
        crop = args.get("crop_size", _datamodule_default(merged, "crop_size"))
        return (list(resize) if isinstance(resize, (list, tuple)) else resize, crop)
    if key.startswith(("model.optim.lr_mult.", "model.optim.weight_decay_mult.")):
        from finegrained.optim import DEFAULT_LR_MULT

        name, part = key.split(".")[2:]
        defaults = DEFAULT_LR_MULT if name == "lr_mult" else {}
        return {**defaults, **(merged["model"].get("optim", {}).get(name) or {})}.get(part, 1.0)
    value = merged
    for part in key.split("."):
        if part not in value:
            if key.startswith("data.init_args."):
                return _datamodule_default(merged, part)
            return _default(key)
        value = value[part]
    return value


def _default(key):
    """The value a setting the recipe leaves out takes: the constructor default of its owner."""
    from finegrained.callbacks import ActivationGradientClipping, TwoStageFinetuning
    from finegrained.model import FineGrainedClassifier
    from finegrained.optim import OptimSettings

    owners = {"model.optim": OptimSettings, "model": FineGrainedClassifier, "stage1": TwoStageFinetuning,
              "clip_activation_grad": ActivationGradientClipping}
    section, _, name = key.rpartition(".")
    if section in owners:
        return inspect.signature(owners[section].__init__).parameters[name].default
    return {"svm": False}[key]


def test_every_recipe_has_a_protocol():
    names = {os.path.basename(p)[:-5] for p in glob.glob(os.path.join(RECIPES, "cub", "*.yaml"))}
    assert names == set(ROWS)


@pytest.mark.parametrize("dataset", DATASETS)
@pytest.mark.parametrize("row", sorted(ROWS))
def test_recipe_settings_match_the_official_code(row, dataset):
    merged = load_recipe(os.path.join(RECIPES, dataset, f"{row}.yaml"))
    expected = PROTOCOLS[ROWS[row]]
    wrong = []
    for key, (value, source) in expected.items():
        if key.startswith("input/") and key != f"input/{dataset}":
            continue
        got = setting(merged, key, dataset)
        if isinstance(value, float) and isinstance(got, (int, float)):
            ok = math.isclose(got, value, rel_tol=1e-9)
        else:
            ok = got == value or (isinstance(value, tuple) and tuple(got) == value)
        if not ok:
            wrong.append(f"{key}: {got!r}, official {value!r} ({source})")
    assert not wrong, f"{dataset}/{row}: " + "; ".join(wrong)
    with open(os.path.join(RECIPES, dataset, f"{row}.yaml")) as f:
        header = f.read()
    assert "# Remaining deviations from the official code:" in header


def _model(merged):
    from finegrained.model import FineGrainedClassifier

    config = dict(merged["model"])
    config.update(backbone_weights=None, num_classes=3)
    return FineGrainedClassifier(**config)


def _stage1(merged):
    from finegrained.callbacks import TwoStageFinetuning

    return TwoStageFinetuning(**merged.get("stage1", {}))


def _stage_groups(model, merged, epoch):
    """{group name: (lr, weight decay)} of the optimiser the model and the two-stage callback build, at the start of
    ``epoch`` (the callback's own epoch-start hook sets stage 1's weight decay)."""
    from finegrained.optim import configure_optimizers

    stage1 = _stage1(merged)
    config = configure_optimizers(model.parts(), model.optim, merged["trainer"]["max_epochs"],
                                  {"head": model.head.parameter_lr_mult}, stage1)
    optimizer = config["optimizer"] if isinstance(config, dict) else config
    scheduler = config["lr_scheduler"]["scheduler"] if isinstance(config, dict) else None
    for _ in range(epoch):
        optimizer.step()
        scheduler.step()
    stage1.finetune_function(model, epoch, optimizer)
    return {g["name"]: (g["lr"], g["weight_decay"]) for g in optimizer.param_groups}


# protocol -> [(epoch, {group: (lr, weight decay)})]; "stage1" for the cached route's own optimiser
GROUPS = {
    "isqrt_resnet": [(0, {"backbone": (1.2e-3, 1e-4), "head": (1.2e-3, 1e-4), "classifier": (6e-3, 1e-4)})],
    "isqrt_vgg": [(0, {"backbone": (3e-3, 1e-4), "head": (3e-3, 1e-4), "classifier": (6e-2, 1e-4)}),
                  (20, {"backbone": (3e-4, 1e-4), "head": (3e-4, 1e-4), "classifier": (6e-3, 1e-4)})],
    "bcnn_matconvnet": [("stage1", (1.0, 0.0, 256, 300)),
                        (0, {"backbone": (1e-3, 5e-4), "classifier": (1.0, 0.0)})],  # B-CNN's head: no parameters
    "cbp_caffe": [(0, {"backbone": (0.0, 5e-6), "head": (1.0, 5e-6), "classifier": (1.0, 5e-6)}),
                  (107, {"backbone": (0.0, 5e-6), "head": (0.25, 5e-6), "classifier": (0.25, 5e-6)}),
                  (320, {"backbone": (1e-3, 5e-4), "head": (1e-3, 5e-4), "classifier": (1e-3, 5e-4)})],
    "g2de": [("stage1", (1.0, 0.0, 256, 300)), (0, {"backbone": (1e-3, 5e-4), "classifier": (1.0, 0.0)})],
    "hihca": [("stage1", (1.0, 0.0, 256, 300)),
              (0, {"backbone": (1e-3, 5e-4), "head": (1e-3, 5e-4), "head.layer_scales": (1e-2, 5e-4),
                   "classifier": (1e-3, 5e-4)}),
              (10, {"backbone": (1e-4, 5e-4), "head": (1e-4, 5e-4), "head.layer_scales": (1e-3, 5e-4),
                    "classifier": (1e-4, 5e-4)})],
    "lrbp": [(0, {"backbone": (0.01, 5e-4), "head": (0.01, 5e-4)}), (150, {"backbone": (1e-4, 5e-4), "head": (1e-4, 5e-4)})],
}
ONE_ROW_PER_PROTOCOL = {"bcnn_vgg16": "bcnn_matconvnet", "kp_vgg16": "cbp_caffe", "g2de_vgg16": "g2de",
                        "hihca_vgg16": "hihca", "lrbp_vgg16": "lrbp", "isqrt_resnet50": "isqrt_resnet",
                        "mpncov_vgg16": "isqrt_vgg"}


@pytest.mark.parametrize("row", sorted(ONE_ROW_PER_PROTOCOL))
def test_the_optimiser_each_stage_builds(row):
    merged = load_recipe(os.path.join(RECIPES, "cub", f"{row}.yaml"))
    model = _model(merged)
    for epoch, expected in GROUPS[ONE_ROW_PER_PROTOCOL[row]]:
        if epoch == "stage1":
            stage1 = _stage1(merged)
            assert (stage1.lr, stage1.weight_decay, stage1.batch_size, stage1.epochs) == expected
            continue
        got = _stage_groups(model, merged, epoch)
        for name, (lr, wd) in expected.items():
            assert got[name][0] == pytest.approx(lr) and got[name][1] == pytest.approx(wd), (row, epoch, name, got[name])
