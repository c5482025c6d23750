"""Weights for backbones, handled in one place.

:func:`load_weights` loads ``None`` (random init, nothing to do), ``"imagenet"`` (the family's
source: torchvision's default weights downloaded once into torch's hub cache by
:func:`hub_cached_file`, or a file a pip package installs) or a path to a state dict, always with
``weights_only=True``, into the *full* network before it is cut. Offline, a missing download is a
:class:`WeightsUnavailableError` that names the file and where to put it.
"""
from __future__ import annotations

import os
from typing import Callable, Dict, List, Mapping, Optional, Union
from urllib.parse import urlparse

import torch
from torch import Tensor, nn

from finegrained.checkpoint_file import CheckpointFileError, read_checkpoint_file

Weights = Union[None, str, os.PathLike, Mapping[str, Tensor]]
StateDict = Dict[str, Tensor]


class WeightsUnavailableError(RuntimeError):
    """Pretrained weights could not be found locally or downloaded."""


def hub_cached_file(url: str, what: str) -> str:
    """The file ``url`` in torch's hub cache (``$TORCH_HOME/hub/checkpoints``), downloaded once if missing.

    The same file and folder as torchvision's own download; ``what`` names the weights in the error.
    """
    path = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(urlparse(url).path))
    if not os.path.isfile(path):
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            torch.hub.download_url_to_file(url, path, progress=True)
        except Exception as err:  # URLError, socket errors, HTTP errors: all mean "not here"
            raise WeightsUnavailableError(
                f"{what} are not cached and could not be downloaded ({type(err).__name__}: {err}).\n"
                f"Expected file: {path}\n"
                f"Download {url} on a machine with internet and copy it into {os.path.dirname(path)} "
                f"(torch.hub cache; set TORCH_HOME to move it), or pass weights=<path to a state dict>."
            ) from err
    return path


def read_state_dict(path: str) -> StateDict:
    """A state dict file read with ``weights_only=True`` (a Lightning-style ``{"state_dict": ...}`` is unwrapped)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"weights file not found: {path} (expected a PyTorch state dict)")
    try:
        state = read_checkpoint_file(path, expected="a state dict saved with torch.save")
    except CheckpointFileError as err:
        raise WeightsUnavailableError(str(err)) from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise WeightsUnavailableError(f"{path} holds a {type(state).__name__}, expected a state dict")
    return state


def _shape(value) -> str:
    return str(tuple(value.shape)) if hasattr(value, "shape") else f"a {type(value).__name__}"


def load_weights(model: nn.Module, name: str, weights: Weights, feature_prefixes: Optional[List[str]] = None,
                 imagenet_file: Optional[Callable[[], str]] = None,
                 fix_keys: Optional[Callable[[StateDict], StateDict]] = None) -> nn.Module:
    """Load ``weights`` into the *full* network ``model`` (before it is cut).

    Args:
        model: the network as its family builds it.
        name: the backbone's name, for messages.
        weights: ``None``, ``"imagenet"``, a path to a state dict, or the state dict itself.
        feature_prefixes: keys that must all be present; missing classifier keys are allowed (a
            backbone needs none), a missing feature key is an error.
        imagenet_file: where the family's ImageNet weights are (called only for ``"imagenet"``).
        fix_keys: renames keys of old checkpoints to the model's.
    """
    if weights is None:
        return model
    if isinstance(weights, Mapping):
        state, weights = dict(weights), "(a state dict)"
    elif str(weights) == "imagenet":
        if imagenet_file is None:
            raise WeightsUnavailableError(f"{name} has no source of ImageNet weights; pass a path to a state dict")
        state = read_state_dict(imagenet_file())
    else:
        state = read_state_dict(os.fspath(weights))
    if fix_keys is not None:
        state = fix_keys(state)
    prefixes = tuple(feature_prefixes or ())
    own = model.state_dict()
    if prefixes:  # a classifier of another class count (a fine-tuned network) is not needed: left out, as if missing
        state = {k: v for k, v in state.items()
                 if k.startswith(prefixes) or k not in own or getattr(v, "shape", None) == own[k].shape}
    reshaped = [f"{k} is {_shape(v)}, expected {_shape(own[k])}" for k, v in state.items()
                if k in own and getattr(v, "shape", None) != own[k].shape]
    if reshaped:
        raise WeightsUnavailableError(f"weights {weights!s} do not fit {name}: {len(reshaped)} tensors of another "
                                      f"shape (e.g. {'; '.join(reshaped[:2])})")
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing_features = [k for k in missing if not prefixes or k.startswith(prefixes)]
    if missing_features or unexpected:
        raise WeightsUnavailableError(
            f"weights {weights!s} do not fit {name}: {len(missing_features)} missing keys "
            f"(e.g. {missing_features[:3]}), {len(unexpected)} unexpected keys (e.g. {unexpected[:3]})")
    return model
