"""Any timm model as a feature extractor: ``build_backbone("timm/<model name>")``.

Wightman, "PyTorch Image Models" (timm), https://github.com/huggingface/pytorch-image-models.

The backbone runs timm's ``forward_features`` and returns a (B, C, h, w) map with ``out_channels = C``:

==============================  ==============================================================
family                          map
==============================  ==============================================================
CNNs (ResNet, ConvNeXt,         the last stage's map (B, C, H/32, W/32); ``last_stride=1`` builds
EfficientNet, RegNet, ...)      the model with timm's ``output_stride=16`` (dilated last stage)
ViT / DeiT / EVA                the patch tokens after the final norm as a map: ViT-S/16 at 224 gives
                                (B, 384, 14, 14); built with ``dynamic_img_size`` so 448 inputs work
                                (position embeddings interpolated by timm)
Swin and other NHWC models      the last stage's (B, H, W, C) output permuted to (B, C, H, W)
==============================  ==============================================================

The class token (ViT, DeiT, EVA: ``class_token_dim = D``; 0 where the model has none) is returned with
the map, as ``(map, class_token)`` with (B, D), only while ``return_class_token`` is set: the model sets it
for heads that use it (SoT), so every other head sees the map alone.

Weights: ``None`` (random), ``"imagenet"`` (timm's default pretrained tag for the name) or another timm
tag (``"augreg_in21k_ft_in1k"``), both through timm's download (the Hugging Face hub); or a local
``.pth``/``.bin``/``.safetensors`` file in timm's own parameter names, read by timm with
``weights_only=True`` and adapted by the model's own checkpoint filter. Offline, a missing download is a
:class:`~finegrained.backbones.weights.WeightsUnavailableError` naming the file to fetch and where it goes.
"""
from __future__ import annotations

import contextlib
import difflib
import os
from collections.abc import Mapping
from typing import Any, Dict, List, Tuple, Union

import torch
from torch import Tensor, nn

from finegrained.backbones.base import Backbone
from finegrained.backbones.weights import Weights, WeightsUnavailableError

PREFIX = "timm/"
WEIGHT_FILE_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors", ".npz")


def timm_families() -> List[str]:
    """timm's model families (its model modules, e.g. ``convnext``, ``vision_transformer``, ``swin_transformer``)."""
    import timm

    return sorted(timm.list_modules())


def timm_models(family: str) -> List[str]:
    """The model names of one timm family, usable as ``timm/<name>``."""
    import timm

    return timm.list_models(module=family)


class TimmFeatures(nn.Module):
    """``forward_features`` of a timm model, as a (B, C, h, w) map (and the class token when asked).

    Args:
        model: a timm model built with ``num_classes=0``.
        layout: ``"NCHW"`` (CNNs), ``"NHWC"`` (Swin) or ``"tokens"`` (ViT-like, (B, prefix + h·w, D)).
        num_prefix_tokens: class, distillation and register tokens in front of the patch tokens.
        has_class_token: whether token 0 is a class token.
    """

    def __init__(self, model: nn.Module, layout: str, num_prefix_tokens: int = 0, has_class_token: bool = False):
        super().__init__()
        self.model, self.layout = model, layout
        self.num_prefix_tokens, self.has_class_token = num_prefix_tokens, has_class_token
        self.return_class_token = False

    def grid(self, height: int, width: int) -> Tuple[int, int]:
        """(h, w) of the patch grid for an input of height × width."""
        embed = self.model.patch_embed
        if hasattr(embed, "dynamic_feat_size"):
            return tuple(embed.dynamic_feat_size((height, width)))
        patch = embed.patch_size
        return height // patch[0], width // patch[1]

    def forward(self, x: Tensor) -> Union[Tensor, Tuple[Tensor, Tensor]]:
        y = self.model.forward_features(x)
        if self.layout == "NHWC":
            return y.permute(0, 3, 1, 2)
        if self.layout == "NCHW":
            return y
        h, w = self.grid(x.shape[-2], x.shape[-1])
        patches = y[:, self.num_prefix_tokens:]
        feature_map = patches.transpose(1, 2).reshape(y.shape[0], y.shape[2], h, w)
        if self.return_class_token and self.has_class_token:
            return feature_map, y[:, 0]
        return feature_map


class TimmBackbone(Backbone):
    """A timm model cut at ``forward_features``; ``class_token_dim`` is D for models with a class token."""

    def __init__(self, features: TimmFeatures, out_channels: int, name: str):
        super().__init__(features, out_channels, name)
        self.class_token_dim = out_channels if features.has_class_token else 0
        self.timm_model_name = name[len(PREFIX):]

    @property
    def return_class_token(self) -> bool:
        return self.features.return_class_token

    @return_class_token.setter
    def return_class_token(self, value: bool) -> None:
        if value and not self.class_token_dim:
            raise ValueError(f"{self.name} has no class token")
        self.features.return_class_token = bool(value)


def _pretrained_arguments(model_name: str, weights: Weights) -> Tuple[str, Dict]:
    """(timm model name with tag, create_model keyword arguments) for ``weights``."""
    if weights is None:
        return model_name, {"pretrained": False}
    if isinstance(weights, Mapping):
        return model_name, {"pretrained": True, "pretrained_cfg_overlay": {"state_dict": dict(weights)}}
    text = os.fspath(weights)
    if text == "imagenet":
        return model_name, {"pretrained": True}
    if os.path.sep in text or text.endswith(WEIGHT_FILE_SUFFIXES) or os.path.exists(text):
        if not os.path.isfile(text):
            raise FileNotFoundError(f"weights file not found: {text} (expected timm weights: .pth, .bin or "
                                    f".safetensors with timm's parameter names)")
        return model_name, {"pretrained": True, "pretrained_cfg_overlay": {"file": text}}
    return f"{model_name}.{text}", {"pretrained": True}  # a timm pretrained tag


def _download_help(tagged_name: str) -> str:
    import timm

    try:
        cfg = timm.models.get_pretrained_cfg(tagged_name)
    except Exception:  # unknown tag: timm's own error says which tags exist
        cfg = None
    hub_id = getattr(cfg, "hf_hub_id", None) or f"timm/{tagged_name}"
    cache = os.environ.get("HF_HUB_CACHE") or os.path.join(
        os.environ.get("HF_HOME", os.path.join(os.path.expanduser("~"), ".cache", "huggingface")), "hub")
    return (f"Download https://huggingface.co/{hub_id}/resolve/main/model.safetensors on a machine with internet "
            f"and pass its path as the weights (--model.backbone_weights PATH), or copy the Hugging Face cache "
            f"of {hub_id} into {cache}. Set HF_HUB_OFFLINE=1 to fail at once instead of retrying.")


@contextlib.contextmanager
def _load_results():
    """The results of every ``load_state_dict`` call while timm builds a model: its ``load_pretrained`` loads
    non-strictly once the classifier is dropped (``num_classes=0``) and only logs the missing and unexpected keys,
    which here must be errors. Yields a list of (module, ``_IncompatibleKeys``)."""
    results: List[Tuple[nn.Module, Any]] = []
    original = nn.Module.load_state_dict

    def load_state_dict(module, *args, **kwargs):
        result = original(module, *args, **kwargs)
        results.append((module, result))
        return result

    nn.Module.load_state_dict = load_state_dict
    try:
        yield results
    finally:
        nn.Module.load_state_dict = original


def _weight_problems(model: nn.Module, results) -> List[str]:
    """What the loads into ``model`` itself left missing or did not use."""
    problems = []
    for module, result in results:
        if module is model:
            if result.missing_keys:
                problems.append(f"Missing keys ({', '.join(result.missing_keys[:10])})")
            if result.unexpected_keys:
                problems.append(f"Unexpected keys ({', '.join(result.unexpected_keys[:10])})")
    return problems


def _create(model_name: str, weights: Weights, **kwargs) -> nn.Module:
    import timm

    tagged_name, pretrained = _pretrained_arguments(model_name, weights)
    try:
        with _load_results() as results:
            model = timm.create_model(tagged_name, num_classes=0, **pretrained, **kwargs)
        problems = _weight_problems(model, results)
        if problems:
            raise WeightsUnavailableError(f"weights {weights!s} do not fit timm/{model_name}: "
                                          + "; ".join(problem[:300] for problem in problems))
        return model
    except (TypeError, WeightsUnavailableError):
        raise  # an argument the model does not take: the caller decides
    except (OSError, RuntimeError, ValueError, KeyError) as err:
        if not pretrained["pretrained"]:
            raise
        if isinstance(err, (RuntimeError, KeyError, ValueError)) and "pretrained_cfg_overlay" in pretrained:
            raise WeightsUnavailableError(f"weights {weights!s} do not fit timm/{model_name}: {err}") from err
        if isinstance(err, (RuntimeError, ValueError)) and "Invalid pretrained tag" in str(err):
            raise ValueError(f"timm has no pretrained tag {tagged_name!r}: {err}") from err
        raise WeightsUnavailableError(
            f"timm could not load the pretrained weights {tagged_name} ({type(err).__name__}: {str(err)[:200]}). "
            + _download_help(tagged_name)) from err


def _model_with_stride(model_name: str, weights: Weights, last_stride: int) -> nn.Module:
    # Transformers take dynamic_img_size (any input size, e.g. 448); CNNs do not know the argument.
    attempts = [{"dynamic_img_size": True}, {}]
    if last_stride == 1:
        attempts = [{"output_stride": 16}]
    for kwargs in attempts:
        try:
            return _create(model_name, weights, **kwargs)
        except TypeError as err:
            if "output_stride" in kwargs:
                raise ValueError(f"timm/{model_name} does not take output_stride, so last_stride=1 is not "
                                 f"available (its map is set by its patch size or stages); use last_stride=2"
                                 ) from err
            if not kwargs:
                raise
    raise AssertionError("unreachable")


def build_timm_backbone(name: str, weights: Weights = None, last_stride: int = 2) -> TimmBackbone:
    """``name`` = ``"timm/<model name>"`` (any of ``timm.list_models()``)."""
    import timm

    model_name = name[len(PREFIX):]
    if not timm.is_model(model_name.split(".")[0]):
        close = difflib.get_close_matches(model_name, timm.list_models(), n=6, cutoff=0.6)
        raise ValueError(f"timm has no model {model_name!r}" + (f"; similar: {', '.join(close)}" if close else ""))
    model = _model_with_stride(model_name, weights, last_stride)
    model.eval()
    with torch.no_grad():
        size = _probe_size(model)
        probe = model.forward_features(torch.zeros(1, 3, size, size))
    model.train()
    channels = int(model.num_features)
    if probe.dim() == 3:
        prefix = int(getattr(model, "num_prefix_tokens", 0))
        has_class = getattr(model, "cls_token", None) is not None
        features = TimmFeatures(model, "tokens", prefix, has_class)
    elif probe.dim() == 4 and probe.shape[1] == channels:
        features = TimmFeatures(model, "NCHW")
    elif probe.dim() == 4 and probe.shape[-1] == channels:
        features = TimmFeatures(model, "NHWC")
    else:
        raise ValueError(f"timm/{model_name}: forward_features gives {tuple(probe.shape)}, not a feature map or tokens")
    return TimmBackbone(features, channels, name)


def _probe_size(model: nn.Module) -> int:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    return int((cfg.get("input_size") or (3, 224, 224))[-1])
