"""Export a trained FineGrainedClassifier to ONNX or TorchScript, with a JSON manifest.

The artifact maps images (B, 3, h, w), float32, preprocessed as the manifest says, to
logits (B, num_classes): the network ``finegrained test`` evaluates, so with ``test_flip`` (the default)
the mean of the logits of each image and its horizontal flip (the manifest's ``output.flip_averaged``). The
manifest ``<FILE>.json`` beside it records the class names, the preprocessing (its settings and the ordered steps
that reproduce it with PIL and numpy alone), the model recipe and the sha256 of the artifact; the export checks
the artifact against PyTorch and records the largest difference.

The class names, the preprocessing settings and the flip averaging are also embedded in the artifact (ONNX model
metadata ``finegrained.contract``; TorchScript extra file ``finegrained.json``), where the sha256 covers them:
``predict-images`` refuses a manifest that says otherwise, so an edited manifest cannot relabel predictions.

ONNX has no eigendecomposition, so heads built on one (``mpncov``, ``o2p``, ``g2de``) export
their documented eigendecomposition-free substitute (:func:`finegrained.heads.onnx_substitutes`).
The artifact is checked against PyTorch running the same substitute (parity ≤ 1e-4, enforced),
and the substitute itself against the exact eigendecomposition model; that second error is
measured on the given images (validation images from ``finegrained export --config``, else
random inputs), printed and recorded in the manifest.
"""
from __future__ import annotations

import datetime
import hashlib
import io
import json
import os
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch

from datamodules.transforms import preprocessing_spec, preprocessing_steps
from finegrained.heads import onnx_substitutes
from finegrained.model import load_classifier
from finegrained.resume import replacing, write_atomically

FORMATS = ("onnx", "torchscript")
CONTRACT_KEY = "finegrained.contract"  # ONNX metadata key; TorchScript extra file CONTRACT_FILE
CONTRACT_FILE = "finegrained.json"
PARITY_TOLERANCE = 1e-4
# For checkpoints saved without a DataModule: the published 512 -> 448 ImageNet-normalised protocol.
_DEFAULT_PREPROCESSING = preprocessing_spec(512, 448)


def sha256_file(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def manifest_path(artifact_path: str) -> str:
    return artifact_path + ".json"


def checkpoint_outputs(hp) -> Tuple[List[str], Dict[str, Any]]:
    """The class names (``"0"``, ``"1"``, ... when the checkpoint has none) and the test preprocessing (the published
    512 -> 448 protocol when it has none) of a classifier's hyper-parameters: what every export promises."""
    return (list(hp.get("class_names") or [str(i) for i in range(hp.num_classes)]),
            dict(hp.get("preprocessing") or _DEFAULT_PREPROCESSING))


def contract(class_names, preprocessing: Dict[str, Any], flip_averaged: bool) -> Dict[str, Any]:
    """What the artifact's outputs mean and how its inputs are made: embedded in the artifact, repeated in the
    manifest."""
    settings = {k: v for k, v in preprocessing.items() if k != "steps"}
    settings.setdefault("exif_transpose", False)
    settings.setdefault("bottom_crop", 0)
    return {"class_names": list(class_names), "preprocessing": settings, "flip_averaged": bool(flip_averaged)}


def contract_text(value: Dict[str, Any]) -> str:
    return json.dumps(value, sort_keys=True)


def embedded_contract(path: str, fmt: str) -> Optional[Dict[str, Any]]:
    """The contract embedded in the artifact at ``path``, or None when it holds none."""
    if fmt == "onnx":
        import onnx

        model = onnx.load(path, load_external_data=False)
        text = next((p.value for p in model.metadata_props if p.key == CONTRACT_KEY), None)
    else:
        files = {CONTRACT_FILE: ""}
        torch.jit.load(path, map_location="cpu", _extra_files=files)
        text = files[CONTRACT_FILE] or None
    return json.loads(text) if text else None


def crop_hw(preprocessing: Dict[str, Any]):
    crop = preprocessing["crop"]
    return (crop, crop) if isinstance(crop, int) else tuple(crop)


def _run_onnx(path: str, images: torch.Tensor) -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: images.numpy()})[0]


def _embed_in_onnx(path: str, promised: Dict[str, Any]) -> None:
    import onnx

    model = onnx.load(path)
    onnx.helper.set_model_props(model, {CONTRACT_KEY: contract_text(promised)})
    onnx.save(model, path)


def export_classifier(checkpoint_path: str, fmt: str, out_path: str, opset: Optional[int] = None,
                      images: Optional[torch.Tensor] = None) -> Dict[str, Any]:
    """Export ``checkpoint_path`` to ``out_path`` and write the manifest; returns the manifest.

    ``images`` (N, 3, h, w), preprocessed, are the inputs of the parity and substitute checks;
    by default two random images.
    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown export format {fmt!r}; known: {', '.join(FORMATS)}")
    model = load_classifier(checkpoint_path)
    hp = model.hparams
    # Export plain modules: the artifact holds the network as `finegrained test` evaluates it (flip
    # averaging included), not the Lightning trainer plumbing.
    network = model.inference_network().eval()
    class_names, preprocessing = checkpoint_outputs(hp)
    promised = contract(class_names, preprocessing, network.test_flip)
    preprocessing = promised["preprocessing"]
    height, width = crop_hw(preprocessing)
    measured_on = "validation images" if images is not None else "random inputs"
    if images is None:
        images = torch.randn(2, 3, height, width, generator=torch.Generator().manual_seed(0))
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)

    with torch.no_grad():
        maps = [model.backbone(view) for view in network.views(images)]  # shared by the exact and the substitute head
        exact_features = [model.head(m) for m in maps]
        exact = network.average([model.classifier(f) for f in exact_features])
    substitute = None
    previous_export(out_path)  # a file of the user's at --out is refused before any work
    # Written beside the target and renamed over it once checked: a full disk, a failed check or a kill leaves the
    # previous export (or nothing), never a partial file at --out.
    with replacing(out_path, f"{fmt} model") as tmp:
        if fmt == "onnx":
            with torch.no_grad(), onnx_substitutes(network) as descriptions:
                features = [model.head(m) for m in maps]
                reference = network.average([model.classifier(f) for f in features]).numpy()
                batch = torch.export.Dim("batch", min=1)
                program = torch.onnx.export(network, (images[:2],), input_names=["images"], output_names=["logits"],
                                            dynamic_shapes=({0: batch},), opset_version=opset, dynamo=True)
            program.save(tmp, external_data=False)
            _embed_in_onnx(tmp, promised)
            exported = _run_onnx(tmp, images)
            if descriptions:
                substitute = {
                    "description": "; ".join(descriptions),
                    "measured_on": f"{len(images)} {measured_on}",
                    "logits_max_abs_error": float((torch.as_tensor(reference) - exact).abs().max()),
                    "features_max_abs_error": float((features[0] - exact_features[0]).abs().max()),
                    "features_max_abs": float(exact_features[0].abs().max()),
                }
        else:
            reference = exact.numpy()
            with torch.no_grad():
                traced = torch.jit.trace(network, images[:2])
            # Saved to memory first: TorchScript's own file writer aborts the process on a full disk.
            buffer = io.BytesIO()
            torch.jit.save(traced, buffer, _extra_files={CONTRACT_FILE: contract_text(promised)})
            with open(tmp, "wb") as f:
                f.write(buffer.getbuffer())
            exported = torch.jit.load(tmp)(images).detach().numpy()
        _check_parity(fmt, out_path, exported, reference, exact, substitute)
        digest = sha256_file(tmp)
    max_diff = float(np.abs(exported - reference).max())

    manifest = {
        "format": fmt,
        "file": os.path.basename(out_path),
        "sha256": digest,
        "class_names": class_names,
        "preprocessing": {**preprocessing, "steps": preprocessing_steps(preprocessing)},
        "input": {"name": "images", "shape": ["batch", 3, height, width], "dtype": "float32"},
        "output": {"name": "logits", "shape": ["batch", len(class_names)],
                   "flip_averaged": network.test_flip, "probabilities": "softmax of the logits over the classes",
                   "computes": ("the mean of the logits of each image and its horizontal flip, as finegrained test"
                                if network.test_flip else "the logits of each image, as finegrained test")},
        "model": {k: hp.get(k) for k in ("backbone", "backbone_weights", "last_stride", "head", "head_kwargs",
                                         "num_classes", "test_flip")},
        "source_checkpoint": os.path.abspath(checkpoint_path),
        "parity_max_abs_diff": max_diff,
        "eig_substitute": substitute,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    path = manifest_path(out_path)
    write_atomically(path, json.dumps(manifest, indent=2).encode(), "manifest")
    manifest["manifest_path"] = path
    return manifest


def _check_parity(fmt: str, out_path: str, exported: np.ndarray, reference: np.ndarray, exact: torch.Tensor,
                  substitute: Optional[Dict[str, Any]]) -> None:
    """The artifact computes what PyTorch computes (≤ 1e-4; with an eigendecomposition substitute, within twice its
    distance to the exact model more), else a RuntimeError and no export."""
    max_diff = float(np.abs(exported - reference).max())
    tolerance = PARITY_TOLERANCE
    if substitute:
        # An iterative substitute amplifies float32 rounding, and two runtimes round differently:
        # each is about as far from the exact model as PyTorch's substitute is, so they may be twice
        # that apart. What users need, the artifact's distance to the exact model, is recorded too.
        tolerance += 2 * substitute["logits_max_abs_error"]
        substitute["artifact_vs_eig_logits_max_abs_error"] = float(np.abs(exported - exact.numpy()).max())
    if not max_diff <= tolerance:
        raise RuntimeError(f"exported {fmt} model differs from PyTorch by {max_diff:.3g} "
                           f"(tolerance {tolerance:.3g}); {out_path} was not written")


def previous_export(out_path: str) -> None:
    """Refuse an ``out_path`` (or its manifest) that holds a file which is not an export this tool wrote: a
    previous export (its manifest names the file and the file still has the recorded sha256) may be replaced."""
    mpath = manifest_path(out_path)
    if not os.path.lexists(out_path) and not os.path.lexists(mpath):
        return
    if os.path.isdir(out_path):
        raise ValueError(f"{out_path}: is a folder; expected the path of the file to export to")
    try:
        with open(mpath, encoding="utf-8") as f:
            manifest = json.load(f)
        ours = (isinstance(manifest, dict) and manifest.get("file") == os.path.basename(out_path)
                and os.path.isfile(out_path) and manifest.get("sha256") == sha256_file(out_path))
    except (OSError, ValueError):
        ours = False
    if not ours:
        raise ValueError(f"{out_path}: already exists and is not an export of finegrained (no manifest {mpath} "
                         f"that matches it); choose another --out or remove the file (nothing was changed)")
