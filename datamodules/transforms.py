"""Fine-grained preprocessing, described by a small dict so exports can carry it.

Training: resize, random crop, horizontal flip. Test: resize, centre crop.
``resize`` is an int (shorter side, aspect kept, as for CUB) or [h, w] (exact size, as for
Aircraft 512×512 and Cars 448×448).
"""
from __future__ import annotations

from typing import Dict, Sequence, Union

import torch
from torchvision.transforms import InterpolationMode
from torchvision.transforms import v2 as T

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

Size = Union[int, Sequence[int]]


def preprocessing_spec(resize: Size, crop: Size, mean: Sequence[float] = IMAGENET_MEAN,
                       std: Sequence[float] = IMAGENET_STD) -> Dict:
    """The test-time preprocessing as plain data (stored in checkpoints and export manifests)."""
    as_list = lambda s: list(s) if isinstance(s, (list, tuple)) else int(s)  # noqa: E731
    return {"resize": as_list(resize), "crop": as_list(crop), "mean": list(mean), "std": list(std),
            "interpolation": "bilinear", "color": "RGB"}


def _to_normalized_tensor(mean, std):
    return [T.ToImage(), T.ToDtype(torch.float32, scale=True), T.Normalize(list(mean), list(std))]


def train_transform(resize: Size, crop: Size, mean=IMAGENET_MEAN, std=IMAGENET_STD, hflip: bool = True):
    ops = [T.Resize(resize, interpolation=InterpolationMode.BILINEAR, antialias=True), T.RandomCrop(crop)]
    if hflip:
        ops.append(T.RandomHorizontalFlip())
    return T.Compose(ops + _to_normalized_tensor(mean, std))


def eval_transform(spec: Dict):
    """Test transform from :func:`preprocessing_spec` output."""
    return T.Compose([T.Resize(spec["resize"], interpolation=InterpolationMode.BILINEAR, antialias=True),
                      T.CenterCrop(spec["crop"])] + _to_normalized_tensor(spec["mean"], spec["std"]))
