"""Where a :class:`~finegrained.network.FineGrainedNetwork`'s weights come from, in one place (as timm's builder).

* ImageNet, a timm tag or a state-dict file for the backbone: the backbone builders
  (:mod:`finegrained.backbones.weights`, :mod:`finegrained.backbones.timm_models`), called from here.
* The authors' ImageNet-trained second-order models (fast-MPN-COV's ``mpncovresnet50-15991845.pth``, ...,
  :mod:`finegrained.pretrained`): the trunk goes into the backbone, the 1×1 reduction and its BatchNorm into the
  head when it has a block of that shape (:func:`authors_checkpoint`, :func:`load_authors_head`).
* ``init_from``: a trained checkpoint (of ``finegrained fit`` or a saved network state dict); tensors whose
  names and shapes match are copied, the others (e.g. a classifier for another number of classes) stay at their
  initialisation and are listed (:func:`load_matching_weights`).

Checkpoints are read with ``weights_only=True`` (:func:`finegrained.checkpoint_file.read_checkpoint_file`).
Messages go to the ``finegrained`` logger, which the command line prints once (first process).
"""
from __future__ import annotations

import logging
import os
from typing import Any, Dict, List, Mapping, Optional

from torch import Tensor, nn

from finegrained.backbones.weights import read_state_dict
from finegrained.checkpoint_file import read_checkpoint_file
from finegrained.pretrained import SplitCheckpoint, split_authors_checkpoint

log = logging.getLogger(__name__)

# The LightningModule keeps its network as ``network``: its checkpoints' keys start with this.
CLASSIFIER_PREFIX = "network."
NETWORK_PARTS = ("backbone.", "head.", "classifier.")


def authors_checkpoint(backbone: Any, backbone_weights: Any) -> Optional[SplitCheckpoint]:
    """The file's split when ``backbone_weights`` is a file holding one of the authors' second-order models
    (:mod:`finegrained.pretrained`); None for ``None``, ``"imagenet"``, a plain backbone state dict, a module
    backbone or a timm backbone."""
    if isinstance(backbone, nn.Module) or str(backbone).startswith("timm/"):
        return None
    if backbone_weights is None or str(backbone_weights) == "imagenet" or not os.path.isfile(str(backbone_weights)):
        return None
    return split_authors_checkpoint(read_state_dict(str(backbone_weights)), str(backbone_weights))


def load_authors_head(head: nn.Module, split: SplitCheckpoint, source: str, head_name: str,
                      head_kwargs: Optional[Mapping[str, Any]], last_stride: int) -> None:
    """The reduction trained with the authors' head goes into ``head`` when it has the same block."""
    own = head.state_dict()
    if all(k in own and own[k].shape == v.shape for k, v in split.head.items()):
        head.load_state_dict(split.head, strict=False)
        blocks = sorted({"head." + k.rsplit(".", 1)[0] for k in split.head})
        reduction = f"{len(split.head)} reduction tensors -> {', '.join(blocks)}"
    else:
        reduction = f"reduction dropped ({head_name} with head_kwargs {dict(head_kwargs or {})} has no block of its shape)"
    log.info(f"backbone_weights {source}: {split.layout}: {len(split.trunk)} tensors -> backbone; {reduction}; "
             f"dropped {', '.join(split.dropped) or 'nothing'}")
    if last_stride != 1:
        log.info(f"backbone_weights {source}: the authors trained layer4 with stride 1 (last_stride: 1)")


def network_state(state: Mapping[str, Tensor]) -> Dict[str, Tensor]:
    """A network's state dict from a classifier checkpoint's ``state_dict`` (keys ``network.backbone...``), from one
    written before the network was its own module (``backbone...``), or from a network's own state dict."""
    if any(key.startswith(CLASSIFIER_PREFIX) for key in state):
        return {key[len(CLASSIFIER_PREFIX):]: value for key, value in state.items() if key.startswith(CLASSIFIER_PREFIX)}
    return {key: value for key, value in state.items() if key.startswith(NETWORK_PARTS)}


def read_classifier_checkpoint(path: str, map_location: Any = "cpu") -> Dict[str, Any]:
    """A checkpoint written by ``finegrained fit``: ``{"hyper_parameters", "state_dict", ...}``, read with
    ``weights_only=True``; ValueError naming the file for anything else."""
    checkpoint = read_checkpoint_file(path, map_location=map_location)
    if not isinstance(checkpoint, dict) or "hyper_parameters" not in checkpoint or "state_dict" not in checkpoint:
        raise ValueError(f"{path}: not a FineGrainedClassifier checkpoint "
                         f"(expected 'hyper_parameters' and 'state_dict' entries)")
    return checkpoint


def read_network_state(path: str) -> Dict[str, Tensor]:
    """The network's tensors in ``path``: a ``finegrained fit`` checkpoint, or a network's own state dict saved with
    ``torch.save(network.state_dict(), path)``; ValueError naming the file for anything else."""
    saved = read_checkpoint_file(path, map_location="cpu")
    if isinstance(saved, dict) and "state_dict" in saved and "hyper_parameters" in saved:
        return network_state(saved["state_dict"])
    if isinstance(saved, dict) and saved and all(isinstance(v, Tensor) for v in saved.values()):
        state = network_state(saved)
        if state:
            return state
    raise ValueError(f"{path}: neither a FineGrainedClassifier checkpoint (expected 'hyper_parameters' and "
                     f"'state_dict' entries) nor a FineGrainedNetwork state dict (keys backbone., head., classifier.)")


def load_matching_weights(network: nn.Module, checkpoint_path: str) -> List[str]:
    """Copy the tensors of ``checkpoint_path`` (:func:`read_network_state`) whose names and shapes match
    ``network``'s; returns the names dropped (each logged)."""
    state = read_network_state(checkpoint_path)
    own = network.state_dict()
    kept = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    dropped = sorted(k for k in state if k not in kept)
    network.load_state_dict(kept, strict=False)
    for name in dropped:
        shape = tuple(state[name].shape)
        where = f"here {tuple(own[name].shape)}" if name in own else "not in this model"
        log.info(f"init_from {checkpoint_path}: dropped {name} {shape} ({where})")
    log.info(f"init_from {checkpoint_path}: loaded {len(kept)} tensors, dropped {len(dropped)}")
    return dropped
