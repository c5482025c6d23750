"""``finegrained report``: a static HTML page of what a trained classifier learned.

For a checkpoint and the data of its recipe, the page (``DIR/index.html``, jinja2 with autoescape, relative
links, no remote resources, opens from disk) shows:

* the run: recipe, backbone, head and its dimension, data, checkpoint choice, top-1 / top-5 / mean per-class
  accuracy on the split, all computed on every image of the split (flip-averaged as ``finegrained test``);
* per-class accuracy for every class, worst first (the numbers are the confusion matrix's);
* the most-confused pairs (both directions counted), each with example images of both classes side by side and
  the images that went wrong between them with their predicted class;
* Grad-CAM overlays (Selvaraju et al., "Grad-CAM", ICCV 2017; the ``grad-cam`` library) for correct and wrong
  images, on the backbone's last feature map (ViT: the final norm's tokens, through the library's
  ``vit_reshape_transform``; Swin: ``swinT_reshape_transform``);
* the training curves (loss, accuracy, learning rate per parameter group) kept with the checkpoint;
* the exports made from the checkpoint (their manifests, if found beside it).

Only the images drawn are sampled (``--images-per-pair``, ``--cam-images``); every number uses all images.
"""
from __future__ import annotations

import functools
import glob
import json
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import pandas as pd
import torch
from torch import Tensor
from tqdm import tqdm

from finegrained.results.output_folder import owned_output, previous_output

TEMPLATE = "report.html.j2"


@dataclass
class Predictions:
    """Every image of the split: labels (N,), top-5 predictions (N, k) and the dataset indices (N,)."""

    labels: np.ndarray
    top: np.ndarray
    class_names: List[str]

    @property
    def predicted(self) -> np.ndarray:
        return self.top[:, 0]

    def confusion(self) -> np.ndarray:
        k = len(self.class_names)
        counts = np.zeros((k, k), dtype=np.int64)
        np.add.at(counts, (self.labels, self.predicted), 1)
        return counts

    def accuracy(self) -> Dict[str, Optional[float]]:
        counts = self.confusion()
        per_class = np.diag(counts) / np.maximum(counts.sum(1), 1)
        present = counts.sum(1) > 0
        top5 = None
        if self.top.shape[1] >= 5:
            top5 = float((self.top[:, :5] == self.labels[:, None]).any(1).mean())
        return {"top1": float((self.predicted == self.labels).mean()), "top5": top5,
                "mean_class_acc": float(per_class[present].mean()), "images": int(len(self.labels))}


@dataclass
class ConfusedPair:
    a: int
    b: int
    a_as_b: int
    b_as_a: int
    examples_a: List[str] = field(default_factory=list)
    examples_b: List[str] = field(default_factory=list)
    wrong: List[Dict[str, str]] = field(default_factory=list)

    @property
    def count(self) -> int:
        return self.a_as_b + self.b_as_a


def per_class_rows(counts: np.ndarray, class_names: Sequence[str]) -> List[Dict[str, Any]]:
    """One row per class from the confusion matrix, worst accuracy first (then by name)."""
    rows = []
    for k, name in enumerate(class_names):
        total, correct = int(counts[k].sum()), int(counts[k, k])
        others = counts[k].copy()
        others[k] = 0
        confused = int(others.argmax()) if others.any() else None
        rows.append({"index": k, "name": name, "images": total, "correct": correct,
                     "accuracy": correct / total if total else None,
                     "most_confused_with": class_names[confused] if confused is not None else "",
                     "confused_count": int(others.max()) if others.any() else 0})
    return sorted(rows, key=lambda r: (r["accuracy"] if r["accuracy"] is not None else 2.0, r["name"]))


def most_confused_pairs(counts: np.ndarray, top: int = 10) -> List[ConfusedPair]:
    """Unordered class pairs by C[a, b] + C[b, a] (both directions counted), largest first."""
    symmetric = counts + counts.T
    np.fill_diagonal(symmetric, 0)
    a_idx, b_idx = np.triu_indices(len(counts), k=1)
    totals = symmetric[a_idx, b_idx]
    order = np.lexsort((b_idx, a_idx, -totals))
    return [ConfusedPair(int(a_idx[i]), int(b_idx[i]), int(counts[a_idx[i], b_idx[i]]), int(counts[b_idx[i], a_idx[i]]))
            for i in order[:top] if totals[i] > 0]


@torch.no_grad()
def predict_split(model, loader, class_names: Sequence[str], device: torch.device) -> Predictions:
    """Top-k predictions of every image of ``loader`` with the network ``finegrained test`` evaluates."""
    network = model.inference_network().eval().to(device)
    labels, tops = [], []
    k = min(5, len(class_names))
    for images, targets in tqdm(loader, desc="report: predictions", unit="batch"):
        logits = network(images.to(device))
        tops.append(logits.topk(k, dim=1).indices.cpu().numpy())
        labels.append(torch.as_tensor(targets).cpu().numpy())
    return Predictions(np.concatenate(labels), np.concatenate(tops), list(class_names))


def denormalise(image: Tensor, preprocessing: Dict[str, Any]) -> np.ndarray:
    """A normalised (3, H, W) tensor back to an RGB float image in [0, 1] (H, W, 3)."""
    mean = torch.tensor(preprocessing.get("mean", (0.485, 0.456, 0.406))).view(3, 1, 1)
    std = torch.tensor(preprocessing.get("std", (0.229, 0.224, 0.225))).view(3, 1, 1)
    return (image.cpu() * std + mean).clamp(0, 1).permute(1, 2, 0).numpy()


def _save_png(rgb: np.ndarray, path: str) -> str:
    from PIL import Image

    array = rgb if rgb.dtype == np.uint8 else (np.clip(rgb, 0, 1) * 255).round().astype(np.uint8)
    Image.fromarray(array).save(path)
    return path


def cam_target(backbone, image_size: Tuple[int, int]):
    """(target layer, reshape transform) for Grad-CAM on the backbone's last feature map.

    CNNs: the backbone itself, whose output is the (B, C, h, w) map. Token backbones (ViT, DeiT, EVA): the
    final norm of the timm model with the library's ``vit_reshape_transform`` (one prefix token) or the same
    reshape after dropping all prefix tokens; NHWC backbones (Swin): the final norm, flattened to tokens, with
    the library's ``swinT_reshape_transform``.
    """
    from pytorch_grad_cam.utils.reshape_transforms import swinT_reshape_transform, vit_reshape_transform

    features = getattr(backbone, "features", None)
    layout = getattr(features, "layout", "NCHW")
    if layout == "NCHW" or not hasattr(features, "model"):
        return backbone, None
    norm = features.model.norm
    if layout == "NHWC":
        # timm's Swin gives (B, H, W, C) where the library's swinT_reshape_transform expects (B, H·W, C) tokens
        # (it takes size(2) for C): flatten first, then let the library reshape.
        with torch.no_grad():
            h, w = features.model.forward_features(torch.zeros(1, 3, *image_size)).shape[1:3]
        return norm, lambda tensor: swinT_reshape_transform(tensor.flatten(1, 2), height=h, width=w)
    h, w = features.grid(*image_size)
    if features.num_prefix_tokens == 1:
        return norm, functools.partial(vit_reshape_transform, height=h, width=w)
    prefix = features.num_prefix_tokens

    def drop_prefix(tensor):  # several prefix tokens (distillation or register tokens)
        return tensor[:, prefix:].reshape(tensor.shape[0], h, w, tensor.shape[2]).permute(0, 3, 1, 2)

    return norm, drop_prefix


def grad_cam_maps(model, images: Tensor, targets: Sequence[int], device: torch.device) -> np.ndarray:
    """(N, H, W) Grad-CAM maps in [0, 1] for ``targets`` (the predicted classes), at the images' size."""
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    model = model.eval().to(device)
    layer, reshape = cam_target(model.backbone, tuple(images.shape[-2:]))
    maps = []
    with GradCAM(model=model, target_layers=[layer], reshape_transform=reshape) as cam:
        for image, target in zip(images, targets):
            maps.append(cam(input_tensor=image[None].to(device), targets=[ClassifierOutputTarget(int(target))])[0])
    return np.stack(maps) if maps else np.zeros((0,) + tuple(images.shape[-2:]))


def _sample(indices: np.ndarray, n: int, rng: np.random.Generator) -> List[int]:
    if len(indices) <= n:
        return [int(i) for i in indices]
    return sorted(int(i) for i in rng.choice(indices, size=n, replace=False))


def training_history(checkpoint: Dict[str, Any]) -> Optional[pd.DataFrame]:
    """The per-epoch history the run-artifacts callback keeps in the checkpoint, or None."""
    for key, state in (checkpoint.get("callbacks") or {}).items():
        if "RunArtifacts" in str(key) and state.get("history"):
            return pd.DataFrame(state["history"]).drop_duplicates("epoch", keep="last")
    return None


def exports_of(checkpoint_path: str) -> List[Dict[str, Any]]:
    """Manifests of exports made from ``checkpoint_path``, found in its folder and the run folder above it."""
    folder = os.path.dirname(os.path.abspath(checkpoint_path))
    found = []
    for path in sorted(set(glob.glob(os.path.join(folder, "*.json")) + glob.glob(os.path.join(folder, "..", "*.json")))):
        try:
            with open(path) as f:
                manifest = json.load(f)
        except (OSError, ValueError):
            continue
        if not isinstance(manifest, dict) or "source_checkpoint" not in manifest:
            continue
        same = os.path.abspath(manifest["source_checkpoint"]) == os.path.abspath(checkpoint_path)
        artifact = os.path.join(os.path.dirname(path), manifest.get("file", ""))
        found.append({"manifest": os.path.relpath(path), "file": manifest.get("file", ""),
                      "format": manifest.get("format", ""), "from_this_checkpoint": same,
                      "artifact_present": os.path.isfile(artifact),
                      "parity_max_abs_diff": manifest.get("parity_max_abs_diff"),
                      "flip_averaged": (manifest.get("output") or {}).get("flip_averaged"),
                      "substitute": ((manifest.get("eig_substitute") or {}).get("description") or ""),
                      "created": manifest.get("created", "")})
    return found


def _dataset_image(dataset, index: int) -> Tensor:
    return dataset[index][0]


def write_report(checkpoint_path: str, datamodule, out_dir: str, split: str = "test", recipe: str = "",
                 pairs: int = 10, images_per_pair: int = 3, wrong_per_pair: int = 6, cam_images: int = 8,
                 device: Optional[torch.device] = None, seed: int = 0) -> str:
    """Compute everything and write ``out_dir/index.html``; returns its path.

    ``out_dir`` is new, empty or a previous report (:mod:`finegrained.results.output_folder`): a folder of other
    files is refused before any work, and the previous report's files are replaced only once the new page is done.
    """
    from finegrained.model import classifier_from_checkpoint
    from finegrained.network_weights import read_classifier_checkpoint

    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    previous_output(out_dir, "report")  # refuse a folder of the user's before any work
    checkpoint = read_classifier_checkpoint(checkpoint_path)  # read once: the model, its history and its callbacks' state
    model = classifier_from_checkpoint(checkpoint, checkpoint_path)
    hp = model.hparams
    datamodule.prepare_data()
    datamodule.setup("test" if split == "test" else "validate")
    loader = datamodule.test_dataloader() if split == "test" else datamodule.val_dataloader()
    dataset = loader.dataset
    class_names = classes_of_checkpoint_and_data(hp, getattr(datamodule, "class_names", None),
                                                 checkpoint_path, recipe or type(datamodule).__name__)
    predictions = predict_split(model, loader, class_names, device)
    with owned_output(out_dir, "report") as staging:
        return _write_page(staging, out_dir, checkpoint_path, checkpoint, model, datamodule, dataset, predictions,
                           class_names, split, recipe, pairs, images_per_pair, wrong_per_pair, cam_images, device,
                           seed)


def classes_of_checkpoint_and_data(hp, data_classes, checkpoint_path: str, data_source: str) -> List[str]:
    """The class names, once the checkpoint's and the data's agree (same count, same names in the same order)."""
    model_classes = list(hp.get("class_names") or [])
    data_classes = list(data_classes or [])
    if data_classes and len(data_classes) != hp.num_classes:
        raise ValueError(f"{checkpoint_path}: trained for {hp.num_classes} classes, but the data of {data_source} has "
                         f"{len(data_classes)}; evaluate it on the data it was trained on")
    if model_classes and data_classes and model_classes != data_classes:
        k = next(i for i, (a, b) in enumerate(zip(model_classes, data_classes)) if a != b)
        raise ValueError(f"{checkpoint_path}: class {k} is {model_classes[k]!r} in the checkpoint but "
                         f"{data_classes[k]!r} in the data of {data_source}; evaluate it on the data it was trained on")
    return model_classes or data_classes or [str(k) for k in range(hp.num_classes)]


def _write_page(out_dir: str, final_dir: str, checkpoint_path: str, checkpoint, model, datamodule, dataset,
                predictions: Predictions, class_names: List[str], split: str, recipe: str, pairs: int,
                images_per_pair: int, wrong_per_pair: int, cam_images: int, device, seed: int) -> str:
    """The page and its files in ``out_dir`` (the staging folder); returns the page's path in ``final_dir``."""
    from jinja2 import Environment, PackageLoader, select_autoescape

    from finegrained.resume import checkpoint_selection, completed_epochs
    from finegrained.results.plots import plot_confusion_matrix, plot_training_curves

    hp = model.hparams
    counts = predictions.confusion()
    rng = np.random.default_rng(seed)
    os.makedirs(os.path.join(out_dir, "images"), exist_ok=True)
    preprocessing = hp.get("preprocessing") or {}
    saved: Dict[int, str] = {}

    def image_file(index: int) -> str:
        """The page's copy of image ``index`` (the evaluation crop), written once."""
        if index not in saved:
            name = f"images/img_{index:06d}.png"
            _save_png(denormalise(_dataset_image(dataset, index), preprocessing), os.path.join(out_dir, name))
            saved[index] = name
        return saved[index]

    labels, predicted = predictions.labels, predictions.predicted
    confused = most_confused_pairs(counts, pairs)
    for pair in tqdm(confused, desc="report: confused pairs", unit="pair"):
        pair.examples_a = [image_file(i) for i in _sample(np.flatnonzero(labels == pair.a), images_per_pair, rng)]
        pair.examples_b = [image_file(i) for i in _sample(np.flatnonzero(labels == pair.b), images_per_pair, rng)]
        wrong = np.flatnonzero(((labels == pair.a) & (predicted == pair.b)) | ((labels == pair.b) & (predicted == pair.a)))
        pair.wrong = [{"file": image_file(i), "true": class_names[labels[i]], "predicted": class_names[predicted[i]]}
                      for i in _sample(wrong, wrong_per_pair, rng)]

    cams = []
    correct_idx = _sample(np.flatnonzero(predicted == labels), cam_images // 2, rng)
    wrong_idx = _sample(np.flatnonzero(predicted != labels), cam_images - len(correct_idx), rng)
    chosen = correct_idx + wrong_idx
    if chosen:
        from pytorch_grad_cam.utils.image import show_cam_on_image

        batch = torch.stack([_dataset_image(dataset, i) for i in tqdm(chosen, desc="report: Grad-CAM images")])
        maps = grad_cam_maps(model, batch, [int(predicted[i]) for i in chosen], device)
        for i, cam_map, image in zip(chosen, maps, batch):
            rgb = denormalise(image, preprocessing)
            overlay = show_cam_on_image(rgb.astype(np.float32), cam_map, use_rgb=True)
            name = f"images/cam_{i:06d}.png"
            _save_png(overlay, os.path.join(out_dir, name))
            cams.append({"file": name, "true": class_names[labels[i]],
                         "predicted": class_names[predicted[i]], "correct": bool(labels[i] == predicted[i])})

    curves = None
    history = training_history(checkpoint)
    if history is not None:
        curves = os.path.relpath(plot_training_curves(history, os.path.join(out_dir, "images", "training_curves.png")),
                                 out_dir)
    confusion_png = os.path.relpath(plot_confusion_matrix(counts, class_names,
                                                          os.path.join(out_dir, "images", "confusion_matrix.png")),
                                    out_dir)
    pd.DataFrame(counts, index=class_names, columns=class_names).to_csv(os.path.join(out_dir, "confusion_matrix.csv"))

    accuracy = predictions.accuracy()
    head_dim = model.head.output_dim
    run = {"checkpoint": os.path.abspath(checkpoint_path), "recipe": recipe, "split": split,
           "backbone": hp.backbone, "backbone_weights": checkpoint.get("hyper_parameters", {}).get("backbone_weights"),
           "head": hp.head, "head_kwargs": json.dumps(hp.get("head_kwargs") or {}), "dim": f"{head_dim:,}",
           "data": type(datamodule).__name__, "root": str(getattr(datamodule, "root", "")),
           "classes": len(class_names), "epoch": completed_epochs(checkpoint),
           "checkpoint_choice": checkpoint_selection(checkpoint_path, checkpoint), "test_flip": bool(hp.test_flip)}
    env = Environment(loader=PackageLoader("finegrained.results", "templates"),
                      autoescape=select_autoescape(default=True, default_for_string=True))
    page = env.get_template(TEMPLATE).render(
        title=f"{hp.head} on {hp.backbone}: {split} report", run=run, accuracy=accuracy,
        classes=per_class_rows(counts, class_names), pairs=confused, class_names=class_names, cams=cams,
        curves=curves, confusion_png=confusion_png, exports=exports_of(checkpoint_path))
    with open(os.path.join(out_dir, "index.html"), "w", encoding="utf-8") as f:
        f.write(page)
    return os.path.join(final_dir, "index.html")
