"""``finegrained export --format hf``: a trained checkpoint as a Hugging Face Hub folder, checked.

The network of the checkpoint gets its ``pretrained_cfg`` (class names, preprocessing with the steps that reproduce
it, the test protocol's flip averaging and the run record's accuracy, :mod:`finegrained.network_hub`), is saved
with ``save_pretrained`` beside the target, loaded back with ``from_pretrained`` and compared with the checkpoint's
network as ``finegrained test`` evaluates it (≤ 1e-6), then renamed into place.
"""
from __future__ import annotations

import json
import os
import shutil
from typing import Any, Dict, Optional

import torch

from finegrained.network_hub import CARD_FILE, CONFIG_FILE, WEIGHTS_FILE, hub_config

PARITY_TOLERANCE = 1e-6  # loaded back, the folder's network gives the checkpoint's logits to this


def _previous_folder_export(out_dir: str) -> bool:
    """Whether ``out_dir`` may be written: True for a previous export of this tool (replaced), False for nothing
    there or an empty folder; anything else is refused, unchanged."""
    if not os.path.lexists(out_dir):
        return False
    if not os.path.isdir(out_dir) or os.path.islink(out_dir):
        raise ValueError(f"{out_dir}: exists and is not a folder; expected a new or empty folder, or a previous "
                         f"finegrained export --format hf (nothing was changed)")
    names = set(os.listdir(out_dir))
    if not names:
        return False
    try:
        with open(os.path.join(out_dir, CONFIG_FILE), encoding="utf-8") as f:
            ours = "finegrained_version" in json.load(f) and names <= {CONFIG_FILE, WEIGHTS_FILE, CARD_FILE}
    except (OSError, ValueError, TypeError):
        ours = False
    if not ours:
        raise ValueError(f"{out_dir}: holds files that are not an export of finegrained ({', '.join(sorted(names)[:3])}"
                         f"{', ...' if len(names) > 3 else ''}); choose a new or empty folder (nothing was changed)")
    return True


def export_hub_folder(checkpoint: str, out_dir: str, evaluation: Optional[Dict[str, Any]] = None,
                      images: Optional[torch.Tensor] = None) -> Dict[str, Any]:
    """Write the folder of ``checkpoint`` to ``out_dir`` and check it: loaded back with ``from_pretrained``, it gives
    the logits ``finegrained test`` evaluates (flip averaging included) to 1e-6 on ``images`` (default: two random
    inputs). ``evaluation``: the run record of ``finegrained test`` the model card cites. Written beside ``out_dir``
    and renamed into place once checked. Returns the config and the check."""
    from datamodules.transforms import preprocessing_steps
    from finegrained.export import checkpoint_outputs, crop_hw
    from finegrained.model import load_classifier
    from finegrained.network import FineGrainedNetwork

    if not str(out_dir).strip():
        raise ValueError("--out is empty; expected the path of a new or empty folder")
    replace = _previous_folder_export(out_dir)
    model = load_classifier(checkpoint)
    hp, network = model.hparams, model.network
    class_names, preprocessing = checkpoint_outputs(hp)
    network.pretrained_cfg = {
        "class_names": class_names,
        "preprocessing": {**preprocessing, "steps": preprocessing_steps(preprocessing)},
        "test_flip": bool(hp.test_flip)}
    if evaluation:
        recorded = (evaluation.get("method"), evaluation.get("backbone"))
        if recorded != (hp.head, hp.backbone):
            raise ValueError(f"run {evaluation.get('run_id')} tested {recorded[0]} on {recorded[1]}, but {checkpoint} "
                             f"is {hp.head} on {hp.backbone}; expected a record of this checkpoint")
        network.pretrained_cfg["evaluation"] = evaluation
    if images is None:
        height, width = crop_hw(network.pretrained_cfg["preprocessing"])
        images = torch.randn(2, 3, height, width, generator=torch.Generator().manual_seed(0))
    out_dir = os.path.abspath(out_dir)
    staging = f"{out_dir}.partial-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        network.save_pretrained(staging)
        loaded = FineGrainedNetwork.from_pretrained(staging)
        with torch.no_grad():
            expected = model.eval().inference_network()(images)
            got = loaded.inference_network()(images)
        difference = float((got - expected).abs().max())
        if not difference <= PARITY_TOLERANCE:
            raise RuntimeError(f"the folder's network differs from the checkpoint's by {difference:.3g} "
                               f"(tolerance {PARITY_TOLERANCE:g}); {out_dir} was not written")
        if replace:
            previous = f"{out_dir}.previous-{os.getpid()}"
            os.replace(out_dir, previous)
            os.replace(staging, out_dir)
            shutil.rmtree(previous, ignore_errors=True)
        else:
            if os.path.isdir(out_dir):
                os.rmdir(out_dir)  # empty (checked above)
            os.replace(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return {"config": hub_config(loaded), "parity_max_abs_diff": difference, "folder": out_dir}
