"""Every head inside the classifier: a fast_dev_run fit through the CLI, and ONNX + TorchScript exports."""
import json
import os

import pytest
import torch

from finegrained.cli import main
from finegrained.export import export_classifier
from finegrained.heads import available_heads
from finegrained.model import FineGrainedClassifier
from tests.conftest import SMALL_HEAD_KWARGS, TINY_BACKBONE

SUBSTITUTE_HEADS = {"mpncov", "o2p", "g2de", "mpa"}  # no eigensolver or linear solver in ONNX
# At paper size only: the heads whose ONNX graph approximates a matrix function (their substitutes' error depends on
# the conditioning that paper-size maps have and small ones do not), and Kernel Pooling, whose float32 value on the
# small backbone's sparse maps is itself uncertain at 1e-3 (its float64 value differs by that much), above the
# parity bound of 1e-4.
PAPER_SIZE_ONLY = SUBSTITUTE_HEADS | {"kp"}
PREPROCESSING = {"resize": 72, "crop": 64, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225],
                 "interpolation": "bilinear"}


@pytest.mark.parametrize("name", available_heads())
def test_fast_dev_run_fit_with_every_head(name, trained_run, tmp_path):
    recipe, _, _ = trained_run
    assert main(["fit", "--config", recipe, "--trainer.fast_dev_run", "true", "--model.head", name,
                 "--model.head_kwargs", "{}", "--trainer.default_root_dir", str(tmp_path)]) == 0


def head_checkpoint(name, folder, backbone="resnet18", head_kwargs=None):
    """A classifier with the head (at its paper defaults unless ``head_kwargs``), saved as a Lightning-style
    checkpoint."""
    torch.manual_seed(0)
    model = FineGrainedClassifier(num_classes=3, backbone=backbone, backbone_weights=None, last_stride=1,
                                  head=name, head_kwargs=head_kwargs or {}, class_names=["a", "b", "c"],
                                  preprocessing=PREPROCESSING)
    path = os.path.join(folder, f"{name}.ckpt")
    torch.save({"hyper_parameters": dict(model.hparams), "state_dict": model.state_dict()}, path)
    return path


def _exports(ckpt, name, folder):
    """Both exports of ``ckpt``: their parity with PyTorch, and the eigendecomposition substitute where ONNX needs
    one, measured against the exact head."""
    onnx = export_classifier(ckpt, "onnx", os.path.join(folder, f"{name}.onnx"))
    script = export_classifier(ckpt, "torchscript", os.path.join(folder, f"{name}.pt"))
    assert script["parity_max_abs_diff"] <= 1e-4 and script["eig_substitute"] is None
    if name in SUBSTITUTE_HEADS:
        substitute = onnx["eig_substitute"]
        assert substitute and name in substitute["description"]
        for key in ("logits_max_abs_error", "features_max_abs_error", "artifact_vs_eig_logits_max_abs_error"):
            assert 0 <= substitute[key] < 0.05, (key, substitute[key])
    else:
        assert onnx["eig_substitute"] is None
        assert onnx["parity_max_abs_diff"] <= 1e-4


@pytest.mark.parametrize("name", available_heads())
def test_every_head_exports_to_onnx_and_torchscript(name, tmp_path):
    """Each head's graph: small settings on a small registered backbone (exporting the head is what differs between
    heads), or the paper's settings on ResNet-18 (PAPER_SIZE_ONLY)."""
    if name in PAPER_SIZE_ONLY:
        ckpt = head_checkpoint(name, str(tmp_path))
    else:
        small = {k: v for k, v in SMALL_HEAD_KWARGS[name].items() if k != "num_classes"}
        ckpt = head_checkpoint(name, str(tmp_path), TINY_BACKBONE, small)
    _exports(ckpt, name, str(tmp_path))


def test_isqrt_at_its_paper_size_exports_on_resnet18(tmp_path):
    """The exact route at the size the paper uses (256 channels after the reduction)."""
    _exports(head_checkpoint("isqrt", str(tmp_path)), "isqrt", str(tmp_path))


def test_export_command_prints_substitute_error_on_validation_images(trained_run, tmp_path, capsys):
    recipe, _, _ = trained_run
    ckpt = head_checkpoint("mpncov", str(tmp_path))
    out = str(tmp_path / "mpncov.onnx")
    assert main(["export", "--ckpt", ckpt, "--format", "onnx", "--out", out, "--config", recipe,
                 "--val-batches", "1"]) == 0
    printed = capsys.readouterr().out
    assert "eigendecomposition substitute: mpncov" in printed
    assert "max |substitute - eig| on 4 validation images" in printed
    manifest = json.load(open(out + ".json"))
    assert manifest["eig_substitute"]["measured_on"] == "4 validation images"
