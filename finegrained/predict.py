"""Run an exported classifier (ONNX or TorchScript) on image files.

The artifact's manifest (``<FILE>.json``, written by :mod:`finegrained.export`) supplies the
class names and the preprocessing; an artifact whose sha256 differs from its manifest is
refused. Unreadable images are reported by name and skipped; the others are still predicted.
"""
from __future__ import annotations

import csv
import json
import os
import sys
from typing import Dict, Iterable, List, Tuple

import numpy as np
import torch
from tqdm import tqdm

from datamodules.io import IMAGE_EXTENSIONS, ImageLoadError, load_rgb
from datamodules.transforms import eval_transform
from finegrained.export import manifest_path, sha256_file


class ExportedModel:
    """An exported artifact with its manifest: ``model(images (B,3,h,w)) -> logits (B, K)`` as numpy."""

    def __init__(self, path: str):
        mpath = manifest_path(path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"exported model not found: {path}")
        if not os.path.isfile(mpath):
            raise FileNotFoundError(f"manifest not found: {mpath} (written by 'finegrained export' "
                                    f"next to the model; it holds class names and preprocessing)")
        with open(mpath) as f:
            self.manifest = json.load(f)
        digest = sha256_file(path)
        if digest != self.manifest.get("sha256"):
            raise ValueError(f"{path} does not match its manifest {mpath}: sha256 {digest} != "
                             f"{self.manifest.get('sha256')}; re-export the model")
        self.class_names: List[str] = self.manifest["class_names"]
        self.transform = eval_transform(self.manifest["preprocessing"])
        if self.manifest["format"] == "onnx":
            import onnxruntime as ort

            self._session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
            self._input = self._session.get_inputs()[0].name
        else:
            self._module = torch.jit.load(path, map_location="cpu").eval()
            self._session = None

    def __call__(self, images: torch.Tensor) -> np.ndarray:
        if self._session is not None:
            return self._session.run(None, {self._input: images.numpy()})[0]
        with torch.no_grad():
            return self._module(images).numpy()


def collect_images(inputs: Iterable[str]) -> List[str]:
    """Image files named directly, plus those found recursively in folders (sorted)."""
    paths = []
    for item in inputs:
        if os.path.isdir(item):
            for dirpath, _, files in sorted(os.walk(item)):
                paths += [os.path.join(dirpath, f) for f in sorted(files) if f.lower().endswith(IMAGE_EXTENSIONS)]
        elif os.path.exists(item):
            paths.append(item)
        else:
            raise FileNotFoundError(f"no such image or folder: {item}")
    if not paths:
        raise FileNotFoundError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found in {list(inputs)}")
    return paths


def predict_images(model_path: str, inputs: Iterable[str], topk: int = 5, batch_size: int = 16,
                   csv_path: str | None = None, out=None) -> Tuple[List[Dict], List[Tuple[str, str]]]:
    """Predict the top-k classes of every image; print one line per image and optionally write a CSV.

    Returns ``(rows, failures)``: rows hold ``path``, ``rank``, ``class``, ``index``, ``probability``;
    failures hold ``(path, message)`` for images that could not be read.
    """
    out = out or sys.stdout
    model = ExportedModel(model_path)
    paths = collect_images(inputs)
    topk = min(topk, len(model.class_names))
    rows, failures = [], []
    for start in tqdm(range(0, len(paths), batch_size), desc="predict", unit="batch", disable=len(paths) <= batch_size,
                      file=sys.stderr):
        batch_paths, tensors = [], []
        for path in paths[start:start + batch_size]:
            try:
                tensors.append(model.transform(load_rgb(path)))
                batch_paths.append(path)
            except ImageLoadError as err:
                failures.append((path, str(err)))
                print(f"error: {err}", file=sys.stderr)
        if not tensors:
            continue
        logits = torch.from_numpy(model(torch.stack(tensors)))
        probs, idx = logits.softmax(dim=1).topk(topk, dim=1)
        for path, p_row, i_row in zip(batch_paths, probs.tolist(), idx.tolist()):
            ranked = [(model.class_names[i], i, p) for i, p in zip(i_row, p_row)]
            print(f"{path}: " + ", ".join(f"{name} ({p:.3f})" for name, _, p in ranked), file=out)
            rows += [{"path": path, "rank": r + 1, "class": name, "index": i, "probability": round(p, 6)}
                     for r, (name, i, p) in enumerate(ranked)]
    if csv_path:
        os.makedirs(os.path.dirname(os.path.abspath(csv_path)), exist_ok=True)
        with open(csv_path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=["path", "rank", "class", "index", "probability"])
            writer.writeheader()
            writer.writerows(rows)
        print(f"wrote {csv_path}", file=out)
    if failures:
        print(f"{len(failures)} of {len(paths)} images could not be read (listed above)", file=sys.stderr)
    return rows, failures
