"""Fine-grained preprocessing, described by a small dict so exports can carry it.

Training: resize, random or centre crop (``train_crop``, per protocol: the official iSQRT-COV code crops
the centre, compact bilinear pooling's code a random 448 of 512×512), horizontal flip. Test: resize,
centre crop.
``resize`` is an int (shorter side, aspect kept, as for CUB) or [h, w] (exact size, as for
Aircraft 512×512 and Cars 448×448).
"""
from __future__ import annotations

from typing import Dict, List, Sequence, Union

import numpy as np
import torch
from torchvision.transforms import InterpolationMode
from torchvision.transforms import v2 as T

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

Size = Union[int, Sequence[int]]


def preprocessing_spec(resize: Size, crop: Size, mean: Sequence[float] = IMAGENET_MEAN,
                       std: Sequence[float] = IMAGENET_STD, exif_transpose: bool = False) -> Dict:
    """The test-time preprocessing as plain data (stored in checkpoints and export manifests).

    ``exif_transpose``: whether images are turned upright by their EXIF orientation when decoded (a spec without
    the key means no). A DataModule that removes rows at the bottom of every image
    before resizing (FGVC-Aircraft's banner) adds ``"bottom_crop": rows``, so that ``predict-images`` decodes
    exactly as its test loader.
    """
    as_list = lambda s: list(s) if isinstance(s, (list, tuple)) else int(s)  # noqa: E731
    return {"resize": as_list(resize), "crop": as_list(crop), "mean": list(mean), "std": list(std),
            "interpolation": "bilinear", "color": "RGB", "exif_transpose": bool(exif_transpose)}


class ToNormalizedTensor(torch.nn.Module):
    """RGB PIL image (or H×W×3 uint8 array) -> normalised float32 (3, H, W) tensor in one pass.

    Equal to ``ToImage, ToDtype(float32, scale=True), Normalize(mean, std)`` (≤ 1e-6), about twice
    as fast: one float conversion and one fused scale-and-shift instead of three passes, which
    matters when JPEG decoding is already cheap (see ``finegrained bench loader``).
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        self.mean, self.std = list(mean), list(std)
        self.scale = torch.tensor([1.0 / (255.0 * s) for s in std]).view(3, 1, 1)
        self.shift = torch.tensor([m / s for m, s in zip(mean, std)]).view(3, 1, 1)

    def forward(self, image) -> torch.Tensor:
        array = np.array(image, dtype=np.float32)
        if array.ndim != 3 or array.shape[2] != 3:
            raise ValueError(f"expected an RGB image (H, W, 3), got an array of shape {array.shape}")
        return torch.from_numpy(array).permute(2, 0, 1).mul_(self.scale).sub_(self.shift)

    def extra_repr(self) -> str:
        return f"mean={self.mean}, std={self.std}"


def _to_normalized_tensor(mean, std):
    return [ToNormalizedTensor(mean, std)]


TRAIN_CROPS = ("random", "center")


def train_transform(resize: Size, crop: Size, mean=IMAGENET_MEAN, std=IMAGENET_STD, hflip: bool = True,
                    train_crop: str = "random"):
    """Training transform: resize, ``train_crop`` crop (``"random"`` or ``"center"``), optional flip."""
    if train_crop not in TRAIN_CROPS:
        raise ValueError(f"train_crop must be one of {TRAIN_CROPS}, got {train_crop!r}")
    crop_op = T.RandomCrop(crop) if train_crop == "random" else T.CenterCrop(crop)
    ops = [T.Resize(resize, interpolation=InterpolationMode.BILINEAR, antialias=True), crop_op]
    if hflip:
        ops.append(T.RandomHorizontalFlip())
    return T.Compose(ops + _to_normalized_tensor(mean, std))


def eval_transform(spec: Dict):
    """Test transform from :func:`preprocessing_spec` output."""
    return T.Compose([T.Resize(spec["resize"], interpolation=InterpolationMode.BILINEAR, antialias=True),
                      T.CenterCrop(spec["crop"])] + _to_normalized_tensor(spec["mean"], spec["std"]))


def preprocessing_steps(spec: Dict) -> List[str]:
    """The test-time preprocessing of ``spec`` as the ordered steps a client without this package follows with PIL and
    numpy to get the same input tensor (export manifests carry them). Each step is what
    :func:`datamodules.io.decode_cropped` and :func:`eval_transform` do."""
    resize, crop = spec["resize"], spec["crop"]
    if isinstance(resize, int):
        target = (f"the shorter side to {resize} and the longer to int({resize} * longer / shorter) (truncated); "
                  f"unchanged if already that size")
        request = f"(ceil(W * {resize} / min(W, H)), ceil(H * {resize} / min(W, H)))"
    else:
        target = f"exactly {resize[1]} wide and {resize[0]} high"
        request = f"({resize[1]}, {resize[0]})"
    crop_h, crop_w = (crop, crop) if isinstance(crop, int) else crop
    steps = [
        "open the file with PIL (W x H stored pixels)",
        f"with (rw, rh) = {request}" + (" (swapped when the EXIF orientation is 5 to 8)" if spec.get("exif_transpose")
                                         else "") +
        ": a JPEG with W > 2 * rw and H > 2 * rh is decoded at a reduced DCT scale, Image.draft('RGB', (rw, rh)), "
        "before it is loaded",
        "convert to RGB (Image.convert('RGB'); one 16-bit grey channel is first scaled to 8 bits: "
        "(value * 255 + 32767) // 65535)",
    ]
    if spec.get("bottom_crop"):
        steps.append(f"remove round({spec['bottom_crop']} * decoded width / W) rows at the bottom")
    if spec.get("exif_transpose"):
        steps.append("turn the image upright by its EXIF orientation (as PIL.ImageOps.exif_transpose)")
    steps += [
        f"resize with PIL Image.resize(..., Image.BILINEAR): {target}",
        f"centre crop to {crop_w} wide and {crop_h} high: left = round((w - {crop_w}) / 2), top = round((h - "
        f"{crop_h}) / 2) with Python's round (half to even); pad with zeros where the image is smaller",
        "float32 array (h, w, 3) * (1 / (255 * std)) - mean / std, per channel, both as float32 constants; "
        "transpose to (3, h, w) and stack images to (N, 3, h, w)",
    ]
    return steps
