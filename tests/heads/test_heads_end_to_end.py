"""Every head inside the classifier: a fast_dev_run fit through the CLI, and ONNX + TorchScript exports."""
import json
import os

import pytest
import torch

from finegrained.cli import main
from finegrained.export import export_classifier
from finegrained.heads import available_heads
from finegrained.model import FineGrainedClassifier

SUBSTITUTE_HEADS = {"mpncov", "o2p", "g2de", "mpa"}  # no eigensolver or linear solver in ONNX
PREPROCESSING = {"resize": 72, "crop": 64, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225],
                 "interpolation": "bilinear"}


@pytest.mark.parametrize("name", available_heads())
def test_fast_dev_run_fit_with_every_head(name, trained_run, tmp_path):
    recipe, _, _ = trained_run
    assert main(["fit", "--config", recipe, "--trainer.fast_dev_run", "true", "--model.head", name,
                 "--model.head_kwargs", "{}", "--trainer.default_root_dir", str(tmp_path)]) == 0


def head_checkpoint(name, folder):
    """A resnet18 classifier with the head at its paper defaults, saved as a Lightning-style checkpoint."""
    torch.manual_seed(0)
    model = FineGrainedClassifier(num_classes=3, backbone="resnet18", backbone_weights=None, last_stride=1,
                                  head=name, class_names=["a", "b", "c"], preprocessing=PREPROCESSING)
    path = os.path.join(folder, f"{name}.ckpt")
    torch.save({"hyper_parameters": dict(model.hparams), "state_dict": model.state_dict()}, path)
    return path


@pytest.mark.parametrize("name", available_heads())
def test_every_head_exports_to_onnx_and_torchscript(name, tmp_path):
    ckpt = head_checkpoint(name, str(tmp_path))
    onnx = export_classifier(ckpt, "onnx", str(tmp_path / f"{name}.onnx"))
    script = export_classifier(ckpt, "torchscript", str(tmp_path / f"{name}.pt"))
    assert script["parity_max_abs_diff"] <= 1e-4 and script["eig_substitute"] is None
    if name in SUBSTITUTE_HEADS:
        substitute = onnx["eig_substitute"]
        assert substitute and name in substitute["description"]
        for key in ("logits_max_abs_error", "features_max_abs_error", "artifact_vs_eig_logits_max_abs_error"):
            assert 0 <= substitute[key] < 0.05, (key, substitute[key])
    else:
        assert onnx["eig_substitute"] is None
        assert onnx["parity_max_abs_diff"] <= 1e-4


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
