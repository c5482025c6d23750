"""What ``finegrained serve`` serves: a Hugging Face folder or an ONNX / TorchScript export, as one interface.

``ServedModel(source)``: ``class_names``, ``preprocessing``, :meth:`~ServedModel.preprocess` (an image file's bytes
-> (3, h, w), exactly as the test loader), :meth:`~ServedModel.logits` ((B, 3, h, w) -> (B, K), the network as
``finegrained test`` evaluates it, flip averaging included) and :func:`describe` (the metadata the server shows,
read without loading the weights).
"""
from __future__ import annotations

import os
from typing import Any, Dict

import torch

from datamodules.transforms import eval_transform
from finegrained.export import manifest_path
from finegrained.network_hub import CONFIG_FILE, read_local_config
from finegrained.predict import ExportedModel, preprocess_image, read_manifest


def _summary(config: Dict[str, Any]) -> Dict[str, Any]:
    evaluation = config.get("evaluation") or {}
    keys = ("dataset", "top1", "top5", "mean_class_acc", "selection", "validation", "run_id", "timestamp")
    return {"backbone": config.get("backbone"), "head": config.get("head"), "test_flip": config.get("test_flip"),
            "evaluation": {k: evaluation[k] for k in keys if k in evaluation}}


def describe(source: str) -> Dict[str, Any]:
    """The metadata of ``source`` for ``/info``: format, class names, preprocessing and the model card's summary."""
    if os.path.isdir(source):
        config, path = read_local_config(source), os.path.join(source, CONFIG_FILE)
        if not config.get("class_names") or not config.get("preprocessing"):
            raise ValueError(f"{path}: no class_names or preprocessing; expected a folder written by finegrained "
                             f"export --format hf")
        return {"format": "hf", "source": os.path.abspath(source), "classes": config["class_names"],
                "preprocessing": config["preprocessing"], "card": _summary(config)}
    if not os.path.isfile(source):
        raise FileNotFoundError(f"{source}: not found; expected a folder of finegrained export --format hf, or an "
                                f".onnx / .pt export with its manifest")
    if not os.path.isfile(manifest_path(source)):
        raise FileNotFoundError(f"{manifest_path(source)}: not found; expected the manifest finegrained export writes "
                                f"beside {os.path.basename(source)} (a checkpoint is served once exported: finegrained "
                                f"export --format hf)")
    manifest = read_manifest(manifest_path(source))
    return {"format": manifest["format"], "source": os.path.abspath(source), "classes": manifest["class_names"],
            "preprocessing": manifest["preprocessing"],
            "card": _summary({**(manifest.get("model") or {}), "test_flip": manifest["output"].get("flip_averaged")})}


class ServedModel:
    """A Hugging Face folder (loaded with ``FineGrainedNetwork.from_pretrained``) or an export (with its manifest,
    checked as ``predict-images`` checks it), on ``device`` (exports run on the CPU)."""

    def __init__(self, source: str, device: str = "cpu"):
        self.metadata = describe(source)
        self.class_names, self.preprocessing = self.metadata["classes"], self.metadata["preprocessing"]
        self.transform = eval_transform(self.preprocessing)
        if self.metadata["format"] == "hf":
            from finegrained.network import FineGrainedNetwork

            self.device = torch.device(device)
            self._network = FineGrainedNetwork.from_pretrained(source, map_location=str(self.device)) \
                .inference_network().eval()
            self._export = None
        else:
            self.device = torch.device("cpu")
            self._export = ExportedModel(source)

    def preprocess(self, data: bytes, name: str = "image") -> torch.Tensor:
        """(3, h, w) from an image file's bytes, exactly as the test loader and ``predict-images``."""
        return preprocess_image(data, self.preprocessing, self.transform, name=name)

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, h, w) -> (B, K) on the CPU."""
        if self._export is not None:
            return torch.from_numpy(self._export(images))
        with torch.no_grad():
            return self._network(images.to(self.device)).float().cpu()
