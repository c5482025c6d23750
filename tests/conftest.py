"""Shared fixtures: tiny datasets written in the exact on-disk formats, and a tiny trained model."""
import json
import os
import subprocess
import sys
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from finegrained.backbones import Backbone, register_backbone

# Under pytest-xdist each worker gets its share of the cores: OpenMP threads that outnumber the cores spin and
# slow every worker down.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1) // _WORKERS))

# Colours that make the classes separable, so a few steps of training mean something.
PALETTE = [(220, 40, 40), (40, 200, 40), (40, 60, 220), (230, 200, 30), (160, 40, 200)]


def finegrained_command():
    """The installed ``finegrained`` console script for subprocess tests (the module when not installed)."""
    exe = os.path.join(os.path.dirname(sys.executable), "finegrained")
    return [exe] if os.path.isfile(exe) else [sys.executable, "-m", "finegrained.cli"]


REPO_ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))


# The environment of the tests' finegrained processes: one thread each (two DDP processes, or two pytest-xdist
# workers, share the 2 cores), and ``tests`` importable for callbacks named in ``--trainer.callbacks``.
SUBPROCESS_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": REPO_ROOT}


def run_finegrained(args, timeout=600):
    """``finegrained ARGS`` in a fresh process (:data:`SUBPROCESS_ENV`); asserts it succeeded and returns the
    result."""
    result = subprocess.run(finegrained_command() + list(args), capture_output=True, text=True, timeout=timeout,
                            cwd=REPO_ROOT, env=SUBPROCESS_ENV)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def printed_by(args, capsys):
    """``finegrained ARGS`` in this process (``finegrained.cli.main``); asserts it succeeded and returns what it
    printed to stdout."""
    from finegrained.cli import main

    capsys.readouterr()
    assert main(list(args)) == 0
    return capsys.readouterr().out


def callback_args(class_name, **init_args):
    """``--trainer.callbacks`` with one callback of tests/ddp_helpers.py."""
    return ["--trainer.callbacks",
            json.dumps([{"class_path": f"tests.ddp_helpers.{class_name}", "init_args": init_args}])]


def write_image(path, colour, size=48, seed=0, fmt=None):
    rng = np.random.default_rng(seed)
    pixels = np.clip(np.array(colour)[None, None, :] + rng.normal(0, 25, (size, size, 3)), 0, 255).astype(np.uint8)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(pixels).save(path, format=fmt)
    return path


def make_image_folder(root, n_classes=3, per_class=6, splits=("train", "test"), size=48):
    """root/<split>/<class_k>/<img>.jpg with class-specific colours."""
    for split in splits:
        for c in range(n_classes):
            for i in range(per_class):
                ext = ".png" if i % 2 else ".jpg"
                write_image(os.path.join(root, split, f"class_{c}", f"{split}_{i:03d}{ext}"),
                            PALETTE[c % len(PALETTE)], size=size, seed=zlib.crc32(f"{split}/{c}/{i}".encode()))
    return str(root)


@pytest.fixture
def image_folder(tmp_path):
    return make_image_folder(tmp_path / "folder")


# Small settings that keep each head's matrix function on the input it is given (no reduction).
SMALL_HEAD_KWARGS = {
    "gap": {}, "bcnn": {}, "improved_bcnn": {}, "isqrt": {"reduction": None}, "mpncov": {"reduction": None},
    "o2p": {}, "g2de": {}, "cbp": {"output_dim": 64}, "kp": {"sketch_dim": 32}, "netvlad": {"clusters": 4},
    "netfv": {"clusters": 4}, "lrbp": {"reduction": 6, "num_classes": 3}, "hihca": {"filters": 32},
    "srsop": {"mid_channels": 8, "out_channels": 6}, "gmsop": {"components": 4, "top_k": 2, "mid_channels": 8,
                                                              "out_channels": 6},
    "sot": {"heads": 2, "rank": 3, "dropout": 0.0}, "dropcov": {"reduction": None}, "isice": {"reduction": None},
    "mpa": {"reduction": None},
}


TINY_BACKBONE = "tests_tiny_cnn"


@register_backbone(TINY_BACKBONE)
def _tiny_cnn(name, weights, last_stride):
    """A registered backbone of two convolutions, 8 channels at 1/4 of the input: for tests about heads and the
    code around them, where the size of the backbone adds time and nothing else."""
    if weights is not None:
        raise ValueError(f"{name} has no pretrained weights")
    features = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, stride=2, padding=1), torch.nn.ReLU(),
                                   torch.nn.Conv2d(8, 8, 3, stride=last_stride, padding=1), torch.nn.ReLU())
    return Backbone(features, 8, name)


def small_head(name, channels=8, num_classes=3):
    """Head ``name`` on ``channels`` input channels with the small settings above."""
    from finegrained.heads import build_head

    return build_head(name, channels, **{"num_classes": num_classes, **SMALL_HEAD_KWARGS.get(name, {})})


TINY_RECIPE = """
seed_everything: 0
runs_csv: {root}/runs.csv
trainer:
  accelerator: cpu
  devices: 1
  max_epochs: 1
  limit_train_batches: 2
  limit_val_batches: 2
  limit_test_batches: 2
  enable_progress_bar: false
  enable_model_summary: false
  default_root_dir: {root}
checkpoint:
  dirpath: {root}/checkpoints
model:
  backbone: {backbone}
  backbone_weights: null
  last_stride: 1
  head: isqrt
  head_kwargs:
    reduction: 16
  optim:
    lr: 0.01
data:
  class_path: datamodules.ImageFolderDataModule
  init_args:
    root: {data}
    val_fraction: 0.34
    batch_size: 4
    num_workers: 0
    resize_size: 72
    crop_size: 64
"""


def tiny_recipe_text(root, data_root, backbone="resnet18"):
    """:data:`TINY_RECIPE` writing under ``root``. MobileNet-V2 (3.5M parameters, checkpoints a third of
    ResNet-18's) suits the tests about training mechanics (resume, kills), where the backbone only adds time."""
    return TINY_RECIPE.format(root=root, data=data_root, backbone=backbone)


def write_tiny_recipe(tmp_dir, data_root, backbone="resnet18"):
    """:func:`tiny_recipe_text` writing under ``tmp_dir``/run, saved as ``tmp_dir``/tiny.yaml."""
    path = os.path.join(tmp_dir, "tiny.yaml")
    with open(path, "w") as f:
        f.write(tiny_recipe_text(os.path.join(tmp_dir, "run"), data_root, backbone))
    return path


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory):
    """A tiny model fitted through the CLI: (recipe path, checkpoint path, data root)."""
    from finegrained.cli import main

    tmp = tmp_path_factory.mktemp("trained")
    data = make_image_folder(tmp / "data")
    recipe = write_tiny_recipe(str(tmp), data)
    assert main(["fit", "--config", recipe]) == 0
    ckpt = os.path.join(str(tmp), "run", "checkpoints", "best.ckpt")
    assert os.path.isfile(ckpt)
    return recipe, ckpt, data


@pytest.fixture(scope="session")
def exported_run(trained_run, tmp_path_factory):
    """:func:`trained_run`'s checkpoint exported once in each format: ``{"onnx": path, "torchscript": path}``, each
    with its manifest beside it. Tests that need a file the tool wrote copy it (:func:`copy_export`) rather than
    changing it."""
    from finegrained.export import export_classifier

    _, ckpt, _ = trained_run
    folder = tmp_path_factory.mktemp("exported")
    paths = {"onnx": str(folder / "m.onnx"), "torchscript": str(folder / "m.pt")}
    for fmt, path in paths.items():
        export_classifier(ckpt, fmt, path)
    return paths


def copy_export(artifact, folder):
    """Copy an export and its manifest into ``folder`` under the same name (a manifest names its file), as the tool
    would have written them there; returns the copy's path."""
    import shutil

    target = os.path.join(str(folder), os.path.basename(artifact))
    shutil.copyfile(artifact, target)
    shutil.copyfile(artifact + ".json", target + ".json")
    return target


@pytest.fixture(scope="session")
def hf_folder(trained_run, tmp_path_factory):
    """trained_run tested on its whole test split, then exported with --format hf: (folder, runs.csv)."""
    from finegrained.cli import main

    recipe, ckpt, _ = trained_run
    tmp = tmp_path_factory.mktemp("served")
    runs = str(tmp / "runs.csv")
    assert main(["test", "--config", recipe, "--ckpt_path", ckpt, "--runs_csv", runs,
                 "--trainer.limit_test_batches", "1.0"]) == 0
    assert main(["export", "--ckpt", ckpt, "--format", "hf", "--out", str(tmp / "hf"), "--runs-csv", runs]) == 0
    return str(tmp / "hf"), runs
