"""Run an exported classifier (ONNX or TorchScript) on image files.

The artifact's manifest (``<FILE>.json``, written by :mod:`finegrained.export`) supplies the
class names and the preprocessing; an artifact whose sha256 differs from its manifest is
refused, and so is a manifest whose class names, preprocessing or flip averaging differ from those embedded in the
artifact. Unreadable images are reported by name and skipped; the others are still predicted.
"""
from __future__ import annotations

import csv
import io
import os
import sys
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np
import torch
from tqdm import tqdm

from datamodules.io import IMAGE_EXTENSIONS, ImageLoadError, decode_cropped
from datamodules.samples import safe_name
from datamodules.transforms import eval_transform
from finegrained.export import contract, embedded_contract, manifest_path, sha256_file
from finegrained.json_file import read_json_object
from finegrained.resume import write_atomically


class ExportedModel:
    """An exported artifact with its manifest: ``model(images (B,3,h,w)) -> logits (B, K)`` as numpy.

    The manifest must describe what the artifact embeds (:func:`finegrained.export.embedded_contract`): the same
    class names, preprocessing and flip averaging, and as many class names as the artifact has outputs.
    """

    def __init__(self, path: str):
        mpath = manifest_path(path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"exported model not found: {path}")
        if not os.path.isfile(mpath):
            raise FileNotFoundError(f"manifest not found: {mpath} (written by 'finegrained export' "
                                    f"next to the model; it holds class names and preprocessing)")
        self.manifest, self._manifest_path = read_manifest(mpath), mpath
        digest = sha256_file(path)
        if digest != self.manifest.get("sha256"):
            raise ValueError(f"{path} does not match its manifest {mpath}: sha256 {digest} != "
                             f"{self.manifest.get('sha256')}; re-export the model")
        self.class_names: List[str] = self.manifest["class_names"]
        self.preprocessing = self.manifest["preprocessing"]
        _check_against_artifact(self.manifest, path, mpath)
        self.transform = eval_transform(self.preprocessing)
        if self.manifest["format"] == "onnx":
            import onnxruntime as ort

            try:
                self._session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
            except Exception as err:  # onnxruntime's own exception types
                raise ValueError(f"{path}: onnxruntime cannot load it ({str(err).splitlines()[0][:200]}); "
                                 f"re-export it") from err
            self._input = self._session.get_inputs()[0].name
            outputs = self._session.get_outputs()[0].shape
            if len(outputs) == 2 and isinstance(outputs[1], int) and outputs[1] != len(self.class_names):
                raise ValueError(f"{mpath}: {len(self.class_names)} class names for a model with {outputs[1]} "
                                 f"outputs ({path}); re-export the model")
        else:
            self._module = torch.jit.load(path, map_location="cpu").eval()
            self._session = None

    def preprocess(self, path: str) -> torch.Tensor:
        """(3, h, w): :func:`preprocess_image` of the file at ``path``."""
        return preprocess_image(path, self.preprocessing, self.transform)

    def __call__(self, images: torch.Tensor) -> np.ndarray:
        if self._session is not None:
            logits = self._session.run(None, {self._input: images.numpy()})[0]
        else:
            with torch.no_grad():
                logits = self._module(images).numpy()
        if logits.ndim != 2 or logits.shape[1] != len(self.class_names):
            raise ValueError(f"{self._manifest_path}: {len(self.class_names)} class names but the model gives outputs "
                             f"of shape {tuple(logits.shape)}; re-export the model")
        return logits


def preprocess_image(source, spec: Dict, transform=None, name: str = "image") -> torch.Tensor:
    """(3, h, w): an image file's path or bytes decoded (JPEG draft, banner rows, EXIF orientation) and transformed
    exactly as the test loader did, by the preprocessing ``spec`` (a preprocessing without ``exif_transpose`` keeps
    the stored orientation). ``predict-images`` and ``finegrained serve`` both use it. ``transform``: the spec's
    :func:`~datamodules.transforms.eval_transform`, built once by the caller."""
    transform = transform or eval_transform(spec)
    return transform(decode_cropped(source, spec["resize"], spec.get("bottom_crop", 0),
                                    exif_transpose=bool(spec.get("exif_transpose", False)), name=name))


MANIFEST_FORMATS = ("onnx", "torchscript")
REQUIRED_PREPROCESSING = ("resize", "crop", "mean", "std")


def read_manifest(mpath: str) -> Dict:
    """The manifest at ``mpath``, checked for what prediction needs (one clear error otherwise)."""
    manifest = read_json_object(mpath, "the .json manifest finegrained export writes")
    if manifest.get("format") not in MANIFEST_FORMATS:
        raise ValueError(f"{mpath}: format {manifest.get('format')!r}; expected one of {', '.join(MANIFEST_FORMATS)}")
    names = manifest.get("class_names")
    if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
        raise ValueError(f"{mpath}: class_names must be a non-empty list of strings")
    spec = manifest.get("preprocessing")
    missing = [k for k in REQUIRED_PREPROCESSING if not isinstance(spec, dict) or k not in spec]
    if missing:
        raise ValueError(f"{mpath}: preprocessing lacks {', '.join(missing)}; expected the preprocessing finegrained "
                         f"export records (resize, crop, mean, std, ...)")
    return manifest


def _check_against_artifact(manifest: Dict, path: str, mpath: str) -> None:
    """The manifest promises what the artifact embeds (class names, preprocessing, flip averaging)."""
    try:
        embedded = embedded_contract(path, manifest["format"])
    except Exception as err:  # protobuf, zip or TorchScript errors: the file's content, not the code
        raise ValueError(f"{path}: not a readable {manifest['format']} model (the format its manifest {mpath} "
                         f"states); re-export it") from err
    if embedded is None:
        raise ValueError(f"{path}: holds no class names and preprocessing of its own (not written by this version of "
                         f"finegrained export); re-export it so that its manifest can be checked")
    stated = contract(manifest["class_names"], manifest["preprocessing"],
                      (manifest.get("output") or {}).get("flip_averaged", embedded["flip_averaged"]))
    for key in ("class_names", "preprocessing", "flip_averaged"):
        if stated[key] != embedded[key]:
            detail = ""
            if key == "class_names" and len(stated[key]) == len(embedded[key]):
                k = next(i for i, (a, b) in enumerate(zip(stated[key], embedded[key])) if a != b)
                detail = f" (class {k}: {stated[key][k]!r} in the manifest, {embedded[key][k]!r} in the model)"
            raise ValueError(f"{mpath}: {key} differ from those embedded in {path}{detail}; the manifest was edited "
                             f"or belongs to another export: re-export the model")


def labelled_folder(folder: str, class_names: Sequence[str]) -> Optional[Dict[str, int]]:
    """``{sub-folder: label}`` when ``folder`` is labelled, else None.

    A folder is labelled when it holds no image at its top and every sub-folder is named after a class of
    the model (its name, or the file-safe form ``finegrained data samples --by-class`` writes, which is distinct
    for distinct classes: :func:`~datamodules.samples.safe_name`).
    """
    labels = {name: i for i, name in enumerate(class_names)}
    labels.update({safe_name(name): i for i, name in enumerate(class_names) if safe_name(name) not in labels})
    entries = list(os.scandir(folder))
    subfolders = [e.name for e in entries if e.is_dir() and not e.name.startswith(".")]
    loose = [e for e in entries if e.is_file() and e.name.lower().endswith(IMAGE_EXTENSIONS)]
    if not subfolders or loose or any(name not in labels for name in subfolders):
        return None
    return {name: labels[name] for name in subfolders}


def collect_images(inputs: Iterable[str], class_names: Sequence[str] = ()) -> List[Tuple[str, Optional[int]]]:
    """``(path, label or None)`` for image files named directly, and those found recursively in folders
    (sorted); images under a labelled folder (:func:`labelled_folder`) get the label of their class folder."""
    images: List[Tuple[str, Optional[int]]] = []
    for item in inputs:
        if os.path.isdir(item):
            labels = labelled_folder(item, class_names)
            for dirpath, _, files in sorted(os.walk(item)):
                label = None
                if labels is not None:
                    label = labels[os.path.relpath(dirpath, item).split(os.sep)[0]] if dirpath != item else None
                images += [(os.path.join(dirpath, f), label) for f in sorted(files)
                           if f.lower().endswith(IMAGE_EXTENSIONS)]
        elif os.path.exists(item):
            images.append((item, None))
        else:
            raise FileNotFoundError(f"no such image or folder: {item}")
    if not images:
        raise FileNotFoundError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found in {list(inputs)}")
    return images


PREDICTION_FIELDS = ["path", "rank", "class", "index", "probability"]


def check_predictions_csv(csv_path: str) -> None:
    """``--csv`` may name a new file or predictions written before (same header); any other file is refused."""
    if not os.path.lexists(csv_path):
        return
    try:
        with open(csv_path, newline="", encoding="utf-8") as f:
            header = next(csv.reader(f), [])
    except (OSError, UnicodeDecodeError, csv.Error):
        header = []
    if header[:len(PREDICTION_FIELDS)] != PREDICTION_FIELDS:
        raise ValueError(f"{csv_path}: already exists and is not a predictions file of finegrained predict-images "
                         f"(header {','.join(PREDICTION_FIELDS)}); choose another --csv (nothing was changed)")


def predict_images(model_path: str, inputs: Iterable[str], topk: int = 5, batch_size: int = 16,
                   csv_path: str | None = None, out=None) -> Tuple[List[Dict], List[Tuple[str, str]]]:
    """Predict the top-k classes of every image; print one line per image and optionally write a CSV.

    Images are decoded and preprocessed exactly as the test loader did (the manifest's preprocessing).
    Images in a labelled folder (one sub-folder per class) also get ``true_class``, and the accuracy over
    them is printed as ``finegrained test`` prints it.

    Returns ``(rows, failures)``: rows hold ``path``, ``rank``, ``class``, ``index``, ``probability`` (and
    ``true_class`` for labelled images); failures hold ``(path, message)`` for images that could not be read.
    """
    out = out or sys.stdout
    if topk < 1 or batch_size < 1:
        raise ValueError(f"--topk and --batch-size must be at least 1, got {topk} and {batch_size}")
    if csv_path:
        check_predictions_csv(csv_path)
    model = ExportedModel(model_path)
    images = collect_images(inputs, model.class_names)
    topk = min(topk, len(model.class_names))
    rows, failures, truth, predicted = [], [], [], []
    for start in tqdm(range(0, len(images), batch_size), desc="predict", unit="batch",
                      disable=len(images) <= batch_size, file=sys.stderr):
        batch, tensors = [], []
        for path, label in images[start:start + batch_size]:
            try:
                tensors.append(model.preprocess(path))
                batch.append((path, label))
            except ImageLoadError as err:
                failures.append((path, str(err)))
                print(f"error: {err}", file=sys.stderr)
        if not tensors:
            continue
        logits = torch.from_numpy(model(torch.stack(tensors)))
        probs, idx = logits.softmax(dim=1).topk(topk, dim=1)
        for (path, label), p_row, i_row in zip(batch, probs.tolist(), idx.tolist()):
            ranked = [(model.class_names[i], i, p) for i, p in zip(i_row, p_row)]
            print(f"{path}: " + ", ".join(f"{name} ({p:.3f})" for name, _, p in ranked), file=out)
            known = {} if label is None else {"true_class": model.class_names[label]}
            rows += [{"path": path, "rank": r + 1, "class": name, "index": i, "probability": round(p, 6), **known}
                     for r, (name, i, p) in enumerate(ranked)]
            if label is not None:
                truth.append(label)
                predicted.append(i_row[0])
    if truth:
        from sklearn.metrics import accuracy_score, balanced_accuracy_score

        print(f"Accuracy on {len(truth)} labelled images: top-1 {accuracy_score(truth, predicted):.4f}, "
              f"mean per-class {balanced_accuracy_score(truth, predicted):.4f}", file=out)
    if csv_path:
        fields = PREDICTION_FIELDS + (["true_class"] if truth else [])
        text = io.StringIO()
        writer = csv.DictWriter(text, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
        write_atomically(csv_path, text.getvalue().encode("utf-8"), "predictions")
        print(f"wrote {csv_path}", file=out)
    if failures:
        print(f"{len(failures)} of {len(images)} images could not be read (listed above)", file=sys.stderr)
    return rows, failures
